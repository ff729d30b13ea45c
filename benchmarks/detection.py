"""Detection quality over the zoo, in the style of TABOR's Table I.

    python benchmarks/detection.py [--datasets fashion-mnist,signs] [--detectors ni,tabor,nc,ncpp]
                                   [--zoo-root zoo] [--models ID,...] [--name detection]
                                   [--settings '{"tabor": {"batch_size": 16}}'] [--jobs 2]

Each (model, detector, settings) result is cached under <zoo>/scans/, keyed by the model's
sha256 and the settings, so a rerun only scans what is new. `--jobs N` scans N models at once,
each in its own process with cores / N threads. On 2 cores it barely pays: against one
two-thread scan at a time, 1.08x on four Fashion-MNIST models (TABOR) and 1.02x on two signs
models (NC and NC++, 1064 vs 1087 s), so the default stays 1. Models are scanned from their ONNX
files through the same loader users get. Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import RESULTS_DIR, markdown_table, write_results  # noqa: E402
from scanner.anomaly import median_absolute_deviation  # noqa: E402
from scanner.detectors import DETECTORS  # noqa: E402
from scanner.metrics import correctness, mask_f1  # noqa: E402
from scanner.scan import ScanSettings, scan_model  # noqa: E402
from scanner.zoo import load_manifest  # noqa: E402


def cache_key(sha256: str, settings: ScanSettings) -> str:
    """Model and fully resolved settings: each detector's settings with its defaults filled in, so
    a row scanned with an override stays cached once that override becomes the default."""
    scan = settings.model_dump(mode="json", exclude={"detector_settings"})
    resolved = {name: DETECTORS[name].settings_model(**settings.detector_settings.get(name, {})).model_dump(mode="json")
                for name in settings.detectors}
    payload = json.dumps({"model": sha256, "settings": scan, "detectors": resolved}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def truth_union(masks: list[np.ndarray]) -> np.ndarray:
    """Several triggers to one target: the restored mask is judged against their union (masks of
    random-position triggers, patch-sized, are not combined: the first one counts)."""
    return np.maximum.reduce(masks) if all(m.shape == masks[0].shape for m in masks) else masks[0]


def truth_masks(zoo: Path, entry: dict) -> dict[int, list[np.ndarray]]:
    masks: dict[int, list[np.ndarray]] = {}
    for trigger in entry["ground_truth"]:
        masks.setdefault(trigger["target"], []).append(np.load(zoo / trigger["mask"]))
    return masks


def group_settings(detectors: tuple[str, ...], seed: int, device: str | None,
                   overrides: dict[str, dict] | None) -> ScanSettings:
    """The settings one group's scan runs with. A device given explicitly is part of the settings,
    so its rows are cached apart from those of the default ("auto"); so are settings overridden
    per detector."""
    extra: dict = {"device": device} if device else {}
    mine = {name: values for name, values in (overrides or {}).items() if name in detectors}
    if mine:
        extra["detector_settings"] = mine
    return ScanSettings(detectors=detectors, seed=seed, **extra)


def cache_path(zoo: Path, entry: dict, detectors: tuple[str, ...], seed: int, device: str | None = None,
               overrides: dict[str, dict] | None = None) -> Path:
    settings = group_settings(detectors, seed, device, overrides)
    key = cache_key(entry["files"]["onnx"]["sha256"], settings)
    return zoo / "scans" / f"{entry['id']}-{'+'.join(detectors)}-{key}.json"


def scan_rows(zoo: Path, entry: dict, detectors: tuple[str, ...], seed: int, device: str | None = None,
              overrides: dict[str, dict] | None = None) -> list[dict]:
    """Scan one zoo model with detectors that run together (NC and NC++ share one restoration),
    or read the cached rows."""
    settings = group_settings(detectors, seed, device, overrides)
    model_file = entry["files"]["onnx"]
    cache = cache_path(zoo, entry, detectors, seed, device, overrides)
    if cache.is_file():
        return json.loads(cache.read_text())
    started = time.perf_counter()
    result = scan_model(zoo / model_file["path"], zoo / "clean_samples.npz", settings)
    wall = round(time.perf_counter() - started, 2)
    rows = [detection_row(zoo, entry, detector, result.detections[detector], result.device, wall)
            for detector in detectors]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=2))
    return rows


def detection_row(zoo: Path, entry: dict, detector: str, detection, device: str, wall_seconds: float) -> dict:
    """One table row: what the detector flagged against the zoo's ground truth. `seconds` is the
    detector's own time (NC++ beside NC counts only its pruning; its notes give NC's share)."""
    targets = entry["targets"]
    f1s, refined_f1s = [], []
    for target, masks in truth_masks(zoo, entry).items():
        if target in detection.triggers:
            union = truth_union(masks)
            f1s.append(mask_f1(detection.triggers[target].mask, union))
            if detection.triggers[target].refined_mask is not None:  # TABOR's pruned mask
                refined_f1s.append(mask_f1(detection.triggers[target].refined_mask, union))
    return {
        "model_id": entry["id"], "dataset": entry["dataset"], "trojaned": entry["trojaned"], "targets": targets,
        "detector": detector, "device": device,
        "flagged_classes": detection.flagged_classes,
        "right_target": (set(targets) <= set(detection.flagged_classes)) if entry["trojaned"] else None,
        "mask_f1": float(np.mean(f1s)) if f1s else None,
        "refined_mask_f1": float(np.mean(refined_f1s)) if refined_f1s else None,
        "correctness": correctness(detection.flagged_classes, targets, entry["trojaned"]),
        "anomaly_index_target": min(float(detection.anomaly_index[t]) for t in targets) if targets else None,
        "max_anomaly_index": detection.max_anomaly_index,
        "seconds": round(detection.seconds, 2),
        "wall_seconds": wall_seconds,
        "restoration_shared": detection.notes.get("restoration") == "shared with nc",
        "steps": detection.notes.get("steps"),
        "anomaly_index": [round(float(v), 3) for v in detection.anomaly_index],
        # TABOR / NC++: the MAD of the eq. (5) metrics, to see where `metric_mad_floor` acts
        "tabor_metric_mad": _mad(detection.statistics.get("tabor_metric")),
    }


def _mad(values) -> float | None:
    """The unscaled, unfloored MAD of a detector statistic (as the anomaly index computes it);
    None without it."""
    if values is None or len(values) == 0:
        return None
    return round(median_absolute_deviation(values), 4)


def detector_groups(detectors: list[str]) -> list[tuple[str, ...]]:
    """Detectors scanned one at a time, except NC and NC++ together (one restoration for both)."""
    if "nc" in detectors and "ncpp" in detectors:
        rest = [(name,) for name in detectors if name not in ("nc", "ncpp")]
        return rest + [("nc", "ncpp")]
    return [(name,) for name in detectors]


RESTORING = ("tabor", "nc", "ncpp")  # detectors whose scans take minutes rather than seconds
_THREADS_PER_JOB = {"threads": 0}  # set before the worker processes fork


def _scan_job(task: tuple) -> tuple[list[dict], bool]:
    """One (model, detector group) scan in a worker; returns its rows and whether they were cached."""
    if _THREADS_PER_JOB["threads"]:
        torch.set_num_threads(_THREADS_PER_JOB["threads"])
    zoo, entry, group, seed, device, overrides = task
    cached = cache_path(zoo, entry, group, seed, device, overrides).is_file()
    return scan_rows(zoo, entry, group, seed, device, overrides), cached


def summarise(rows: list[dict], detectors: list[str]) -> dict:
    summary = {}
    for name in detectors:
        mine = [r for r in rows if r["detector"] == name]
        trojans = [r for r in mine if r["trojaned"]]
        f1s = [r["mask_f1"] for r in trojans if r["mask_f1"] is not None]
        refined = [r["refined_mask_f1"] for r in trojans if r.get("refined_mask_f1") is not None]
        summary[name] = {
            "trojans": len(trojans),
            "caught_right_target": sum(bool(r["right_target"]) for r in trojans),
            "clean": len(mine) - len(trojans),
            "false_alarms": sum(r["correctness"] == "false_alarm" for r in mine),
            "mean_mask_f1": round(float(np.mean(f1s)), 4) if f1s else None,
            "mean_refined_mask_f1": round(float(np.mean(refined)), 4) if refined else None,
            "trojans_index_below_2": sum(r["anomaly_index_target"] < 2 for r in trojans),
            "seconds_total": round(sum(r["seconds"] for r in mine), 1),
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fashion-mnist,signs")
    parser.add_argument("--detectors", default="ni,tabor,nc,ncpp,hotspot")
    parser.add_argument("--zoo-root", type=Path, default=Path("zoo"))
    parser.add_argument("--models", default="", help="only these model ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="detection", help="results file name")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the scan's own, auto)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--jobs", type=int, default=1, help="scans at once, each in its own process (2 on 2 cores)")
    parser.add_argument("--settings", type=json.loads, default={},
                        help="JSON: per detector, fields of its settings that differ from the defaults")
    args = parser.parse_args()
    detectors = args.detectors.split(",")
    only = set(filter(None, args.models.split(",")))
    tasks = []
    for dataset in args.datasets.split(","):
        zoo = args.zoo_root / dataset
        manifest = load_manifest(zoo)
        if not manifest:
            print(f"no zoo at {zoo}: run benchmarks/build_zoo.py --dataset {dataset} --size full", file=sys.stderr)
            return 2
        tasks += [(zoo, entry, group, args.seed, args.device, args.settings)
                  for entry in manifest["models"] if not only or entry["id"] in only
                  for group in detector_groups(detectors)]
    jobs = max(1, args.jobs)
    _THREADS_PER_JOB["threads"] = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    done: dict[int, list[dict]] = {}
    started = time.perf_counter()

    def record(index: int, group_rows: list[dict], cached: bool) -> None:
        done[index] = group_rows
        tally["scan_wall"] += group_rows[0]["wall_seconds"]  # one scan per group, cached or not
        tally["scanned"] += not cached
        for row in group_rows:
            print(f"{row['model_id']:28s} {row['detector']:6s} flagged={row['flagged_classes']} "
                  f"targets={row['targets']} {row['correctness']:13s} idx_target={row['anomaly_index_target']} "
                  f"max={row['max_anomaly_index']:.2f} f1={row['mask_f1']} {row['seconds']:.1f}s", flush=True)

    tally = {"scan_wall": 0.0, "scanned": 0}
    # restorations first, so the short saliency scans fill the cores at the end instead of leaving one idle
    order = sorted(range(len(tasks)), key=lambda i: tasks[i][2][0] not in RESTORING)
    if jobs > 1:
        # fork: workers inherit the parsed tasks; the parent has run no torch op, so no thread pool is copied
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_scan_job, tasks[i]): i for i in order}
            for future in as_completed(futures):
                record(futures[future], *future.result())
    else:
        for i in order:
            record(i, *_scan_job(tasks[i]))
    scan_wall, scanned = tally["scan_wall"], int(tally["scanned"])
    rows = [row for index in range(len(tasks)) for row in done[index]]
    run_wall = time.perf_counter() - started
    summary = summarise(rows, detectors)
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = markdown_table(
        ["model", "detector", "targets", "flagged", "right target", "mask F1", "pruned mask F1", "correctness",
         "index (target)", "max index", "seconds"],
        [[r["model_id"], r["detector"], fmt(r["targets"]), fmt(r["flagged_classes"]), fmt(r["right_target"]),
          fmt(r["mask_f1"]), fmt(r.get("refined_mask_f1")), r["correctness"], fmt(r["anomaly_index_target"]), fmt(r["max_anomaly_index"]),
          fmt(r["seconds"])] for r in rows])
    table += "\n\n## Summary\n\n" + markdown_table(
        ["detector", "trojans", "caught (right target)", "clean", "false alarms", "mean mask F1",
         "mean pruned mask F1", "trojans with index < 2", "seconds"],
        [[n, s["trojans"], s["caught_right_target"], s["clean"], s["false_alarms"], fmt(s["mean_mask_f1"]),
          fmt(s["mean_refined_mask_f1"]), s["trojans_index_below_2"], s["seconds_total"]] for n, s in summary.items()])
    table += (f"\n\nScans: {len(tasks)} (NC and NC++ share one), {scanned} run now, {len(tasks) - scanned} read "
              f"from the cache; {jobs} at a time. Sum of the scans' wall times (as first run): {scan_wall:.0f} s = "
              f"{scan_wall / 3600:.2f} h; this invocation took {run_wall:.0f} s = {run_wall / 3600:.2f} h.")
    path = write_results(args.name, {"datasets": args.datasets.split(","), "detectors": detectors,
                                     "detector_settings": args.settings, "rows": rows,
                                     "summary": summary, "scan_wall_seconds": round(scan_wall, 1),
                                     "jobs": jobs, "scans": len(tasks), "scans_run_now": scanned,
                                     "run_wall_seconds": round(run_wall, 1)},
                         table, results_dir=args.results_dir)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
