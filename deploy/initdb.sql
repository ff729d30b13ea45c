-- The compose stack keeps MLflow and Prefect in two databases of one Postgres.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
