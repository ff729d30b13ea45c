"""trojanscan keeps MLflow's usage telemetry off unless the user turns it on (scanner/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

# environment variables that make MLflow 3.x treat a process as CI or a test run (telemetry off
# regardless): stripped so the control case sees MLflow's default of a user's machine
CI_MARKERS = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
              "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
              "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
              "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}


def telemetry_client_after(code: str) -> bool:
    """Whether MLflow set up its telemetry client in a fresh interpreter that ran `code`."""
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS}
    probe = code + "; from mlflow.telemetry.client import get_telemetry_client; print(get_telemetry_client() is not None)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_importing_scanner_turns_mlflow_telemetry_off_unless_asked_for():
    assert telemetry_client_after("import mlflow")  # control: MLflow alone starts it
    assert not telemetry_client_after("import scanner, mlflow")
    assert telemetry_client_after("import os; os.environ['MLFLOW_DISABLE_TELEMETRY'] = 'false'; import scanner, mlflow")
