"""Size of the HTML audit report for the largest zoo model (target: under 3 MB).

    TROJANSCAN_THREADS=1 .venv/bin/python benchmarks/report_size.py --detectors ni,tabor

Picks the zoo model with the most classes and the largest ONNX file among those whose file
exists (the 43-class signs models beat the 10-class Fashion-MNIST ones), scans it, and renders two
reports: the real one, and a worst case in which every class counts as flagged, so every class's
restored trigger and saliency map is embedded. Writes benchmarks/results/report_size.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from scanner.data import CleanData  # noqa: E402
from scanner.report import ground_truth_from_manifest, write_report  # noqa: E402
from scanner.scan import ScanSettings, save_artifacts, scan_model  # noqa: E402

LIMIT_BYTES = 3 * 1024 * 1024


def largest_model(zoos: list[Path]) -> tuple[Path, dict]:
    """(zoo folder, manifest entry) of the model with the most classes, then the largest ONNX file."""
    candidates = []
    for zoo in zoos:
        manifest_path = zoo / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest.get("models", []):
            onnx = zoo / entry["files"]["onnx"]["path"]
            if onnx.is_file():
                candidates.append(((manifest["num_classes"], onnx.stat().st_size, entry["trojaned"]), zoo, entry))
    if not candidates:
        raise SystemExit(f"no zoo model with an ONNX file under {', '.join(map(str, zoos))}")
    _, zoo, entry = max(candidates, key=lambda c: c[0])
    return zoo, entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, action="append", help="zoo folder(s); default zoo/signs and zoo/fashion-mnist")
    parser.add_argument("--detectors", default="ni,tabor,nc,ncpp")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trojanscan-report-size"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("TROJANSCAN_THREADS", "1")))
    zoo, entry = largest_model(args.zoo or [ROOT / "zoo" / "signs", ROOT / "zoo" / "fashion-mnist"])
    detectors = tuple(args.detectors.split(","))
    print(f"scanning {entry['id']} ({zoo}) with {','.join(detectors)} on {torch.get_num_threads()} thread(s)", flush=True)

    started = time.perf_counter()
    result = scan_model(zoo / entry["files"]["onnx"]["path"], zoo / "clean_samples.npz", ScanSettings(detectors=detectors))
    scan_seconds = time.perf_counter() - started
    data = CleanData.load_npz(zoo / "clean_samples.npz")
    truth = ground_truth_from_manifest(zoo / "manifest.json", entry["id"])
    sizes = {}
    for case in ("real", "every_class_flagged"):
        out = args.work / case
        if case == "every_class_flagged":  # the upper bound: pictures of every class from every detector
            every = list(range(result.model["num_classes"]))
            result.detections = {name: dataclasses.replace(d, flagged_classes=every) for name, d in result.detections.items()}
        save_artifacts(result, data, out)
        (out / "result.json").write_text(json.dumps(result.to_json()))
        html = write_report(out / "result.json", out / "report.html", ground_truth=truth)
        sizes[case] = html.stat().st_size
        print(f"{case}: {html} {sizes[case]} bytes ({sizes[case] / 1024 / 1024:.2f} MiB)", flush=True)

    figures = {
        "model_id": entry["id"], "zoo": str(zoo.relative_to(ROOT) if zoo.is_relative_to(ROOT) else zoo),
        "num_classes": result.model["num_classes"], "detectors": list(detectors),
        "threads": torch.get_num_threads(), "scan_seconds": round(scan_seconds, 1),
        "report_bytes": sizes["real"], "report_bytes_every_class_flagged": sizes["every_class_flagged"],
        "limit_bytes": LIMIT_BYTES, "under_limit": max(sizes.values()) < LIMIT_BYTES,
    }
    table = markdown_table(
        ["model", "classes", "detectors", "report", "every class flagged", "target"],
        [[entry["id"], figures["num_classes"], ",".join(detectors), f"{sizes['real'] / 1024:.0f} KiB",
          f"{sizes['every_class_flagged'] / 1024:.0f} KiB", "< 3 MB"]],
    )
    path = write_results("report_size", figures, table)
    print(table)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
