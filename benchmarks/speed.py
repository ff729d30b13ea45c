"""Detector speed and memory, measured side by side on one model in one run.

    python benchmarks/speed.py [--zoo zoo/fashion-mnist] [--model fm-square5-br] [--threads 2]

Each measurement runs in a fresh process (so its peak RSS is its own) on the same model and
clean data. Ratios (larger = the first is slower, except scan_over_raw_throughput):
nc_over_ni, tabor_over_nc, sequential_over_batched (Neural Cleanse one class at a time vs all
classes batched), scan_over_raw_throughput (restoration images/s over the best raw
forward+backward images/s across batch sizes), tabor_over_cascade (not built yet: null).
Writes benchmarks/results/speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402


def measure(model_path: str, data_path: str, detector: str, settings: dict, threads: int, queue) -> None:
    """Child process: load, scan with one detector, report seconds, peak RSS and counters."""
    import torch

    torch.set_num_threads(threads)
    from scanner.data import CleanData
    from scanner.detectors import DETECTORS
    from scanner.detectors.restoration import fastest_batch
    from scanner.model_io import load_model

    data = CleanData.load_npz(data_path)
    loaded = load_model(model_path, check_data=data.x[:64])
    cls = DETECTORS[detector]
    started = time.perf_counter()
    result = cls(cls.settings_model(**settings), seed=0).scan(loaded.module, data, loaded.num_classes)
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "flagged": result.flagged_classes, "notes": {k: v for k, v in result.notes.items() if k != "device_probe"}}
    if "steps" in result.notes:
        batch = result.settings["batch_size"]
        report["restoration_images"] = int(sum(result.notes["steps"]) * batch)
    if detector == "nc" and not settings.get("slots"):
        best, rates = fastest_batch(loaded.module, data.image_shape, torch.device("cpu"))
        report["raw_images_per_second"] = {str(k): v for k, v in rates.items()}
        report["raw_best_images_per_second"] = max(rates.values())
    queue.put(report)


def run(model_path: Path, data_path: Path, detector: str, settings: dict, threads: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(str(model_path), str(data_path), detector, settings, threads, queue))
    process.start()
    report = queue.get()
    process.join()
    print(f"{detector:6s} {json.dumps(settings):20s} {report['seconds']:8.1f} s  peak {report['peak_rss_mb']:.0f} MB  "
          f"flagged {report['flagged']}", flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--model", default="fm-square5-br")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["id"] == args.model)
    model_path, data_path = args.zoo / entry["files"]["onnx"]["path"], args.zoo / "clean_samples.npz"

    reports = {name: run(model_path, data_path, name, {}, args.threads) for name in ("ni", "nc", "tabor", "ncpp")}
    sequential = run(model_path, data_path, "nc", {"slots": 1}, args.threads)
    nc = reports["nc"]
    scan_rate = nc["restoration_images"] / nc["seconds"]
    ratios = {
        "nc_over_ni": nc["seconds"] / reports["ni"]["seconds"],
        "tabor_over_nc": reports["tabor"]["seconds"] / nc["seconds"],
        "sequential_over_batched": sequential["seconds"] / nc["seconds"],
        "scan_over_raw_throughput": scan_rate / nc["raw_best_images_per_second"],
        "tabor_over_cascade": None,
    }
    default_scan = reports["ni"]["seconds"] + reports["tabor"]["seconds"]
    rows = [[name, f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", r["flagged"]] for name, r in reports.items()]
    rows.append(["nc one class at a time", f"{sequential['seconds']:.1f}", f"{sequential['peak_rss_mb']:.0f}",
                 sequential["flagged"]])
    table = markdown_table(["detector", "seconds", "peak RSS MB", "flagged"], rows)
    table += "\n\n" + markdown_table(["ratio", "value"], [[k, "-" if v is None else f"{v:.2f}"] for k, v in ratios.items()])
    table += f"\n\nDefault scan (ni + tabor): {default_scan:.1f} s. NC restoration {scan_rate:.0f} images/s vs raw best " \
             f"{nc['raw_best_images_per_second']:.0f} images/s. Cascade (`--mode fast`) not built yet."
    write_results("speed", {"model_id": args.model, "device": "cpu", "threads": args.threads, "ratios": ratios,
                            "seconds": {k: r["seconds"] for k, r in reports.items()} | {"nc_sequential": sequential["seconds"],
                                                                                       "default_scan_ni_tabor": default_scan},
                            "peak_memory_mb": {k: r["peak_rss_mb"] for k, r in reports.items()},
                            "details": reports | {"nc_sequential": sequential}}, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
