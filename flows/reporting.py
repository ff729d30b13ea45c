"""Prefect artifacts for a scan: a progress artifact updated while the detectors optimise (for a
scan that runs longer than PROGRESS_AFTER_SECONDS), then a markdown summary, a table of anomaly
indices and a link to the MLflow run."""

from __future__ import annotations

import re
import time
from typing import Any

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from scanner.gate import GateOutcome


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


# a scan still running this long after it started gets a progress artifact; shorter ones (a
# NeuronInspect scan of a small model: about a second) only their summary, table and link.
# Three fewer API writes per short scan, for a Prefect server that a burst of scans keeps busy.
PROGRESS_AFTER_SECONDS = 2.0


class PrefectReporter:
    """The gate's Reporter, writing Prefect artifacts (progress updates at most one per second)."""

    def __init__(self, *key_parts: str) -> None:
        self.key = artifact_key("trojanscan", *key_parts)
        self.started = time.monotonic()
        self.progress_id = None
        self.last_update = 0.0

    def progress(self, fraction: float, text: str) -> None:
        now = time.monotonic()
        if self.progress_id is None:
            if now - self.started < PROGRESS_AFTER_SECONDS or fraction >= 1.0:
                return
            self.progress_id = create_progress_artifact(round(100 * fraction, 1), key=f"{self.key}-progress",
                                                        description=text)
            self.last_update = now
            return
        if now - self.last_update < 1.0 and fraction < 1.0:
            return
        self.last_update = now
        update_progress_artifact(self.progress_id, progress=round(100 * fraction, 1), description=text)

    def scanned(self, outcome: GateOutcome, result: dict[str, Any], run_url: str | None) -> None:
        create_markdown_artifact(summary_markdown(outcome, result, run_url), key=f"{self.key}-summary",
                                 description=f"trojanscan verdict: {outcome.verdict}")
        rows = []
        for name, detection in result.get("detectors", {}).items():
            for k, value in enumerate(detection.get("anomaly_index", [])):
                rows.append({"detector": name, "class": k, "anomaly_index": round(float(value), 3),
                             "flagged": k in detection.get("flagged_classes", [])})
        if rows:
            create_table_artifact(rows, key=f"{self.key}-anomaly", description="anomaly index per class and detector")
        if run_url and run_url.startswith("http"):
            create_link_artifact(run_url, link_text="MLflow scan run", key=f"{self.key}-mlflow-run")

    def note(self, title: str, markdown: str) -> None:
        create_markdown_artifact(f"## {title}\n\n{markdown}", key=artifact_key(self.key, "note"), description=title)


def summary_markdown(outcome: GateOutcome, result: dict[str, Any], run_url: str | None) -> str:
    lines = [f"# {outcome.name} v{outcome.version}: **{(outcome.verdict or outcome.status).upper()}**", ""]
    lines += [f"- {reason}" for reason in outcome.reasons]
    lines += ["", f"- flagged classes: {outcome.flagged_classes or 'none'}",
              f"- promoted: {'yes' if outcome.promoted else 'no'}",
              f"- model sha256: `{result.get('model', {}).get('sha256')}`",
              f"- scan run: {run_url or outcome.scan_run_id}"]
    if outcome.result_dir:
        lines.append(f"- report: `{outcome.result_dir}/report.html`")
    return "\n".join(lines)
