"""trojanscan: find trojan backdoors in image classifiers before they reach production.

The numeric core (data, attacks, models, detectors, anomaly, unlearning, metrics) lives here
and knows nothing about MLflow or Prefect; each external system has its own adapter module.
"""

import os

__version__ = "0.1.0"

# MLflow's usage telemetry stays off unless the user turns it on (MLFLOW_DISABLE_TELEMETRY=false):
# a scanner of untrusted models runs where it cannot phone home, and there the telemetry thread,
# failing to fetch its config, removes an environment variable while other threads read the
# environment; a scan's MLflow call then failed with KeyError '_MLFLOW_TELEMETRY_SESSION_ID' and
# the version ended `error` (1 of 20 at once, benchmarks/registry_latency.py). Set before any
# module here imports mlflow, and inherited by the processes trojanscan starts.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
