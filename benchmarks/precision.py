"""bfloat16 vs float32 model arithmetic in trigger restoration, side by side.

    python benchmarks/precision.py [--zoo-root zoo] [--runs fashion-mnist/fm-square5-br:tabor:2,...]
                                   [--threads 2] [--name precision]

Each run is MODEL:DETECTOR:PAIRS; every pair scans the model once with `precision` fp32 and once
bf16 (channels-last weights both times, as `scanner.scan.place_on_device` puts them on a CPU),
one after the other in this process, so both see the same machine. Also the raw forward+backward
images/s of each precision over the restoration's candidate batches. Prints seconds, steps,
slots, flags, the two largest anomaly indices and the target's; writes
benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table  # noqa: E402
from benchmarks.side_by_side import start, write_side_by_side  # noqa: E402
from scanner.data import CleanData  # noqa: E402
from scanner.detectors import DETECTORS  # noqa: E402
from scanner.detectors.restoration import fastest_batch  # noqa: E402
from scanner.model_io import load_model  # noqa: E402
from scanner.scan import place_on_device  # noqa: E402

CPU = torch.device("cpu")
PRECISIONS = ("fp32", "bf16")
DEFAULT_RUNS = "fashion-mnist/fm-square5-br:tabor:2,fashion-mnist/fm-res-square4-br:nc:1,signs/sg-square3-br:nc:1"


def scan_once(precision: str, module: torch.nn.Module, num_classes: int, data: CleanData, detector: str,
              targets: list[int]) -> dict:
    cls = DETECTORS[detector]
    started = time.perf_counter()
    result = cls(cls.settings_model(precision=precision), seed=0, device=CPU).scan(module, data, num_classes)
    seconds = time.perf_counter() - started
    index = result.anomaly_index
    top = sorted(range(len(index)), key=lambda k: -index[k])[:2]
    return {"precision": precision, "seconds": round(seconds, 1), "steps": int(sum(result.notes["steps"])),
            "slots": result.notes["slots"], "flagged": result.flagged_classes,
            "target_indices": [round(float(index[t]), 2) for t in targets],
            "top_indices": [[int(k), round(float(index[k]), 2)] for k in top]}


def main() -> int:
    args, runs = start(__doc__, DEFAULT_RUNS, "precision")
    rows, raw = [], {}
    for run in runs:
        zoo, entry, detector, model_id = run.zoo, run.entry, run.detector, run.entry["id"]
        data = CleanData.load_npz(zoo / "clean_samples.npz")
        loaded = load_model(zoo / entry["files"]["onnx"]["path"], check_data=data.x[:64])
        module = place_on_device(loaded.module, CPU)
        if model_id not in raw:
            raw[model_id] = {p: {str(k): round(v) for k, v in fastest_batch(
                module, data.image_shape, CPU, min_seconds=1.0, bf16=p == "bf16")[1].items()} for p in PRECISIONS}
        for pair in range(run.pairs):
            for precision in PRECISIONS:
                row = {"model_id": model_id, "detector": detector, "pair": pair,
                       **scan_once(precision, module, loaded.num_classes, data, detector, entry["targets"])}
                rows.append(row)
                print(row, flush=True)
    table = markdown_table(
        ["model", "detector", "pair", "precision", "seconds", "steps", "slots", "flagged", "target index",
         "two largest indices"],
        [[r["model_id"], r["detector"], r["pair"], r["precision"], r["seconds"], r["steps"], r["slots"], r["flagged"],
          r["target_indices"], r["top_indices"]] for r in rows])
    return write_side_by_side(args, rows, raw, table, "precision", "fp32", "bf16")


if __name__ == "__main__":
    raise SystemExit(main())
