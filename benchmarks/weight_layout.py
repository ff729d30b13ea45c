"""Channels-last weights vs the NCHW layout of the ONNX conversion, side by side.

    python benchmarks/weight_layout.py [--zoo-root zoo] [--runs fashion-mnist/fm-square5-br:tabor:2,...]
                                       [--threads 2] [--name weight_layout]

Each run is MODEL:DETECTOR:PAIRS; every pair scans the model once with the weights as loaded
(NCHW) and once channels-last (as `scanner.scan.place_on_device` puts them on a CPU), one after
the other in this process, so both see the same machine. Also the raw forward+backward images/s
of each layout over the restoration's candidate batches. Prints seconds, restoration steps,
flags and the two largest anomaly indices; writes benchmarks/results/<name>.json and .md.
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

CPU = torch.device("cpu")
LAYOUTS = ("nchw", "channels_last")
DEFAULT_RUNS = "fashion-mnist/fm-square5-br:tabor:2,fashion-mnist/fm-res-square4-br:nc:1,signs/sg-square3-br:nc:1"


def loaded_in(layout: str, path: Path, data: CleanData):
    loaded = load_model(path, check_data=data.x[:64])
    if layout == "channels_last":
        loaded.module.to(memory_format=torch.channels_last)
    return loaded


def scan_once(layout: str, path: Path, data: CleanData, detector: str) -> dict:
    loaded = loaded_in(layout, path, data)
    cls = DETECTORS[detector]
    started = time.perf_counter()
    result = cls(cls.settings_model(), seed=0, device=CPU).scan(loaded.module, data, loaded.num_classes)
    seconds = time.perf_counter() - started
    top = sorted(range(len(result.anomaly_index)), key=lambda k: -result.anomaly_index[k])[:2]
    return {"layout": layout, "seconds": round(seconds, 1), "steps": int(sum(result.notes.get("steps", [0]))),
            "flagged": result.flagged_classes,
            "top_indices": [[int(k), round(float(result.anomaly_index[k]), 2)] for k in top]}


def main() -> int:
    args, runs = start(__doc__, DEFAULT_RUNS, "weight_layout")
    rows, raw = [], {}
    for run in runs:
        zoo, entry, detector, model_id = run.zoo, run.entry, run.detector, run.entry["id"]
        path, data = zoo / entry["files"]["onnx"]["path"], CleanData.load_npz(zoo / "clean_samples.npz")
        if model_id not in raw:
            raw[model_id] = {layout: {str(k): round(v) for k, v in fastest_batch(
                loaded_in(layout, path, data).module, data.image_shape, CPU, min_seconds=1.0)[1].items()}
                for layout in LAYOUTS}
        for pair in range(run.pairs):
            for layout in LAYOUTS:
                row = {"model_id": model_id, "detector": detector, "pair": pair, **scan_once(layout, path, data, detector)}
                rows.append(row)
                print(row, flush=True)
    table = markdown_table(["model", "detector", "pair", "layout", "seconds", "steps", "flagged", "two largest indices"],
                           [[r["model_id"], r["detector"], r["pair"], r["layout"], r["seconds"], r["steps"],
                             r["flagged"], r["top_indices"]] for r in rows])
    return write_side_by_side(args, rows, raw, table, "layout", "nchw", "channels_last")


if __name__ == "__main__":
    raise SystemExit(main())
