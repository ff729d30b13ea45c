"""Flow `scan-file`: a manual scan of a model file with a clean-data npz, reported as Prefect
artifacts and an HTML report beside the result JSON. Nothing in the registry changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.reporting import PrefectReporter
from scanner.gate import GateOutcome, write_report
from scanner.scan import ScanSettings, scan_fraction, scan_model


@flow(name="scan-file", flow_run_name="scan {model_path}")
def scan_file(model_path: str, data_path: str, out_dir: str = "trojanscan-scan",
              detectors: list[str] | None = None, seed: int = 0, allow_pickle: bool = False) -> dict[str, Any]:
    settings = ScanSettings(detectors=tuple(detectors or ("ni", "tabor")), seed=seed)
    reporter = PrefectReporter("file", Path(model_path).stem)

    def progress(detector: str, done: int, total: int) -> None:
        reporter.progress(scan_fraction(settings.detectors, detector, done, total), f"{detector}: {done}/{total} classes")

    out = Path(out_dir)
    result = scan_model(model_path, data_path, settings, out_dir=out, allow_pickle=allow_pickle, progress=progress)
    payload = result.to_json()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_report(out)
    outcome = GateOutcome(name=Path(model_path).name, version="file", status=result.verdict, verdict=result.verdict,
                          flagged_classes=result.flagged_classes, reasons=result.reasons, result_dir=str(out))
    reporter.progress(1.0, result.verdict)
    reporter.scanned(outcome, payload, None)
    return payload
