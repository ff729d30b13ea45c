"""trojanscan: find trojan backdoors in image classifiers before they reach production.

The numeric core (data, attacks, models, detectors, anomaly, unlearning, metrics) lives here
and knows nothing about MLflow or Prefect; each external system has its own adapter module.
"""

__version__ = "0.1.0"
