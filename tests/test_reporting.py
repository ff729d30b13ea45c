"""The Prefect artifacts of a scan (flows/reporting.py), written to a real Prefect server from real
flow runs: summary, anomaly table and MLflow link always; a progress bar only for a scan that
runs longer than PROGRESS_AFTER_SECONDS."""

from __future__ import annotations

from typing import Any

import pytest

from scanner.gate import GateOutcome

RESULT = {"detectors": {"ni": {"anomaly_index": [0.5, 4.25, 1.0], "flagged_classes": [1]}},
          "model": {"sha256": "ab" * 32}}
RUN_URL = "http://127.0.0.1:5000/#/experiments/1/runs/abc"


def _artifacts(prefix: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {artifact.key: artifact for artifact in client.read_artifacts(limit=200)
                if artifact.key and artifact.key.startswith(prefix)}


def _scan_flow(version: str):
    from prefect import flow

    from flows.reporting import PrefectReporter

    @flow(name=f"reporting-test-{version}")
    def scan() -> None:
        reporter = PrefectReporter("scan", "reported", version)
        for done in range(1, 11):
            reporter.progress(0.02 + 0.09 * done, f"ni: {done}/10 classes")
        reporter.progress(1.0, "infected")
        outcome = GateOutcome(name="reported", version=version, status="infected", verdict="infected",
                              flagged_classes=[1], reasons=["ni flags class 1 (anomaly index 4.25)"])
        reporter.scanned(outcome, RESULT, RUN_URL)

    return scan


def test_a_short_scan_leaves_summary_table_and_link_without_a_progress_bar(prefect_api: str) -> None:
    _scan_flow("v1")()
    found = _artifacts("trojanscan-scan-reported-v1")
    assert set(found) == {"trojanscan-scan-reported-v1-summary", "trojanscan-scan-reported-v1-anomaly",
                          "trojanscan-scan-reported-v1-mlflow-run"}
    summary = found["trojanscan-scan-reported-v1-summary"]
    assert "INFECTED" in summary.data and "ni flags class 1" in summary.data and RUN_URL in summary.data
    table = found["trojanscan-scan-reported-v1-anomaly"].data
    assert '"anomaly_index": 4.25' in table.replace("'", '"') and '"flagged": true' in table.lower().replace("'", '"')
    assert found["trojanscan-scan-reported-v1-summary"].flow_run_id is not None, "attached to the scan's flow run"


def test_a_long_scan_gets_a_progress_bar_that_ends_full(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import reporting

    monkeypatch.setattr(reporting, "PROGRESS_AFTER_SECONDS", 0.0)  # every scan counts as long
    _scan_flow("v2")()
    found = _artifacts("trojanscan-scan-reported-v2")
    assert "trojanscan-scan-reported-v2-progress" in found and len(found) == 4
    assert float(found["trojanscan-scan-reported-v2-progress"].data) == 100.0
