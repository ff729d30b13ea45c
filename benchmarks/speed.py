"""Detector speed and memory, measured side by side on one model in one run.

    python benchmarks/speed.py [--zoo zoo/fashion-mnist] [--model fm-square5-br] [--threads 2] [--rounds 3]

Each measurement runs in a fresh process (so its peak RSS is its own) on the same model and
clean data. Ratios (larger = the first is slower, except scan_over_raw_throughput):
nc_over_ni, tabor_over_nc, sequential_over_batched (Neural Cleanse one class at a time vs all
classes batched), scan_over_raw_throughput (restoration images/s over the best raw
forward+backward images/s across batch sizes, in the precision the scan chose, the mean of
one sweep just before the scan and one just after it), tabor_over_cascade (full TABOR seconds over the
`--mode fast` cascade's seconds, NeuronInspect included, measured back to back on the same model).
`--rounds N` measures everything N times, interleaved, and reports each ratio's median over
the rounds (each ratio taken within one round): on a shared host one detector's run can take
twice its time in a slow spell. Writes benchmarks/results/speed.json and .md.

    python benchmarks/speed.py --device cuda [--results-dir DIR]

runs the same measurements on a GPU and writes speed_cuda.json/.md instead (peak GPU memory per
detector beside peak RSS); the issue's GPU target is sequential_over_batched >= 3. On either device
`--name` writes the full run to a file of its own (another host's figures beside the committed ones).

    python benchmarks/speed.py --cascade-only --threads 1 [--catches fm-square3-br,fm-clean-cnn-s1,...]
    python benchmarks/speed.py --cascade-only --zoo zoo/signs --model sg-square3-br --name cascade_signs

measures only full TABOR and the cascade (plus NeuronInspect) and merges tabor_over_cascade into
the existing speed.json, keeping the other ratios with the command that measured them (for a
machine shared with other work, where the full run would take too long; with `--name` other than
speed, into a file of its own, e.g. for a 43-class model). `--catches` also runs
full TABOR and the cascade on more zoo models and records whether they flag the same classes.
`--ranker hotspot` lets the saliency hotspot detector rank the classes instead of NeuronInspect;
`--top-k` sets how many of its most suspicious classes TABOR restores (default 3).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import RESULTS_DIR, markdown_table, write_results  # noqa: E402


RAW_SECONDS_PER_BATCH = 1.0  # how long the raw forward+backward rate is measured at each batch size


def measure(model_path: str, data_path: str, detector: str, settings: dict, threads: int, device_name: str,
            queue, raw_before: dict | None = None) -> None:
    """Child process: load, scan with one detector, report seconds, peak RSS and counters.
    `detector` "raw" reports the raw forward+backward sweep alone (both precisions); Neural
    Cleanse's report adds the same sweep after its scan, beside `raw_before` (the "raw" report
    measured just before it in its own process, so it does not count in the scan's peak RSS)."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    from scanner.data import CleanData
    from scanner.detectors import DETECTORS
    from scanner.detectors.restoration import GPU_BATCHES, fastest_batch
    from scanner.model_io import load_model
    from scanner.scan import place_on_device

    data = CleanData.load_npz(data_path)
    loaded = load_model(model_path, check_data=data.x[:64])
    place_on_device(loaded.module, device)  # as scan_model does (in place)
    raw_sweep = dict(candidates=GPU_BATCHES, min_seconds=RAW_SECONDS_PER_BATCH)
    if detector == "raw":  # the sweep alone, in both precisions (the scan after it picks its own)
        queue.put({bf16: fastest_batch(loaded.module, data.image_shape, device, bf16=bf16, **raw_sweep)[1]
                   for bf16 in (False, True)})
        return
    if device.type == "cuda":  # start the clock on a warm device: context creation is not the scan's
        torch.ones(1, device=device).sum().item()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if detector == "cascade":
        # the whole `--mode fast` path: the ranker (NeuronInspect or hotspot), then TABOR on its suspects
        from scanner.scan import ScanSettings, run_detectors

        ranker = settings.get("cascade", {}).get("ranker", "ni")
        both = run_detectors(loaded.module, data, loaded.num_classes,
                             ScanSettings(detectors=(ranker, "tabor"), mode="fast", detector_settings=settings),
                             device)
        result = both["tabor"]
        result.notes["ranker_seconds"] = both[ranker].seconds
    else:
        cls = DETECTORS[detector]
        result = cls(cls.settings_model(**settings), seed=0, device=device).scan(loaded.module, data,
                                                                                 loaded.num_classes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
              "flagged": result.flagged_classes, "notes": {k: v for k, v in result.notes.items() if k != "device_probe"}}
    if detector in ("tabor", "cascade"):
        report["anomaly_index"] = [round(float(v), 3) for v in result.anomaly_index]
    if "steps" in result.notes:
        batch = result.settings["batch_size"]
        report["restoration_images"] = int(sum(result.notes["steps"]) * batch)
    if detector == "nc" and not settings.get("slots"):
        # raw in the arithmetic the scan chose (bfloat16 where the probe took it), so the ratio compares like with like
        bf16 = result.notes.get("precision") == "bf16"
        # a second per batch size: the scan's own probe takes a few passes each, whose maximum over
        # eight sizes on a busy 2-core host was up to twice the steady rate (2026-12-05)
        best, rates = fastest_batch(loaded.module, data.image_shape, device, bf16=bf16, **raw_sweep)
        before = (raw_before or {}).get(bf16, rates)  # without a sweep before (not in main's rounds): after only
        report["raw_precision"] = "bf16" if bf16 else "fp32"
        report["raw_images_per_second_before"] = {str(k): v for k, v in before.items()}
        report["raw_images_per_second"] = {str(k): v for k, v in rates.items()}
        report["raw_best_images_per_second_before"] = max(before.values())
        report["raw_best_images_per_second_after"] = max(rates.values())
        report["raw_best_images_per_second"] = (max(before.values()) + max(rates.values())) / 2
    queue.put(report)


def run(model_path: Path, data_path: Path, detector: str, settings: dict, threads: int, device: str = "cpu",
        raw_before: dict | None = None) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(str(model_path), str(data_path), detector, settings, threads,
                                                    device, queue, raw_before))
    process.start()
    report = queue.get()
    process.join()
    if detector == "raw":
        return report
    print(f"{detector:6s} {json.dumps(settings):20s} {report['seconds']:8.1f} s  peak {report['peak_rss_mb']:.0f} MB  "
          f"flagged {report['flagged']}", flush=True)
    return report


def model_files(zoo: Path, model_id: str) -> tuple[Path, Path, dict]:
    manifest = json.loads((zoo / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["id"] == model_id)
    return zoo / entry["files"]["onnx"]["path"], zoo / "clean_samples.npz", entry


def cascade_rows(zoo: Path, model_ids: list[str], threads: int, first: dict[str, tuple[dict, dict]],
                 device: str = "cpu", cascade: dict | None = None) -> list[dict]:
    """Full TABOR vs the cascade per model: flagged classes, whether the targets are caught, seconds.
    `first` holds runs already made (the speed model) so they are not repeated."""
    rows = []
    for model_id in model_ids:
        model_path, data_path, entry = model_files(zoo, model_id)
        full, fast = first.get(model_id) or (run(model_path, data_path, "tabor", {}, threads, device),
                                             run(model_path, data_path, "cascade", cascade or {}, threads, device))
        targets = entry.get("targets") or []
        rows.append({"model_id": model_id, "targets": targets, "tabor_flagged": full["flagged"],
                     "cascade_flagged": fast["flagged"],
                     "cascade_restored": fast["notes"]["cascade"]["restored_classes"],
                     "tabor_catches": sorted(set(targets) & set(full["flagged"])),
                     "cascade_catches": sorted(set(targets) & set(fast["flagged"])),
                     "same_flags": full["flagged"] == fast["flagged"],
                     "same_catches": set(targets) & set(full["flagged"]) == set(targets) & set(fast["flagged"]),
                     "tabor_seconds": full["seconds"], "cascade_seconds": fast["seconds"]})
    return rows


def cascade_figures(threads: int, rows: list[dict], **runs: dict) -> dict:
    """The cascade part of a result file: thread count, the runs given, per-model rows, catches."""
    return {"threads": threads, **runs, "catches": rows,
            "same_catches": f"{sum(r['same_catches'] for r in rows)}/{len(rows)}"}


def cascade_table(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "targets", "full TABOR flags", "cascade restores", "cascade flags", "same catches", "full s",
         "cascade s"],
        [[r["model_id"], r["targets"], r["tabor_flagged"], r["cascade_restored"], r["cascade_flagged"],
          "yes" if r["same_catches"] else "NO", f"{r['tabor_seconds']:.1f}", f"{r['cascade_seconds']:.1f}"]
         for r in rows])


def round_ratios(r: dict[str, dict]) -> dict[str, float]:
    """The speed ratios of one round of measurements (see the module docstring)."""
    nc = r["nc"]
    return {
        "nc_over_ni": nc["seconds"] / r["ni"]["seconds"],
        "tabor_over_nc": r["tabor"]["seconds"] / nc["seconds"],
        "sequential_over_batched": r["nc_sequential"]["seconds"] / nc["seconds"],
        "scan_over_raw_throughput": nc["restoration_images"] / nc["seconds"] / nc["raw_best_images_per_second"],
        # the figure as measured before 2026-12-06: raw after the scan only
        "scan_over_raw_after_only": nc["restoration_images"] / nc["seconds"] / nc["raw_best_images_per_second_after"],
        "tabor_over_cascade": r["tabor"]["seconds"] / r["cascade"]["seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--model", default="fm-square5-br")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cascade-only", action="store_true",
                        help="measure only full TABOR vs the cascade and merge into the existing speed.json")
    parser.add_argument("--catches", default="", help="more zoo model ids to compare full TABOR and the cascade on")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; cuda writes speed_cuda.json")
    parser.add_argument("--ranker", default="ni", choices=("ni", "hotspot"), help="who ranks the classes in the cascade")
    parser.add_argument("--top-k", type=int, default=3, help="the ranker's most suspicious classes TABOR restores")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every detector this many times, interleaved; ratios are the median over rounds")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="speed", help="another name writes a result file of its own: with "
                        "--cascade-only instead of merging into speed.json; for a full run instead of replacing "
                        "speed.json (e.g. another host's figures beside the committed ones)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    model_path, data_path, _ = model_files(args.zoo, args.model)
    more = [m for m in args.catches.split(",") if m and m != args.model]

    if args.cascade_only:
        tabor = run(model_path, data_path, "tabor", {}, args.threads, args.device)
        cascade_settings = {"cascade": {"ranker": args.ranker, "top_k": args.top_k}}
        cascade = run(model_path, data_path, "cascade", cascade_settings, args.threads, args.device)
        rows = cascade_rows(args.zoo, [args.model, *more], args.threads, {args.model: (tabor, cascade)}, args.device,
                            cascade_settings)
        ratio = tabor["seconds"] / cascade["seconds"]
        section = (f"## Cascade (`--mode fast`), {args.threads} thread(s)\n\nFull TABOR {tabor['seconds']:.1f} s, cascade "
                   f"{cascade['seconds']:.1f} s ({args.ranker} {cascade['notes']['ranker_seconds']:.1f} s + TABOR on classes "
                   f"{cascade['notes']['cascade']['restored_classes']}): tabor_over_cascade = {ratio:.2f}.\n\n"
                   + cascade_table(rows))
        figures_of_cascade = cascade_figures(args.threads, rows, tabor=tabor, cascade=cascade)
        if args.name != "speed":  # a cascade-only result file of its own (another model or data set)
            write_results(args.name, {"model_id": args.model, "device": args.device, "threads": args.threads,
                                      "ratios": {"tabor_over_cascade": ratio},
                                      "seconds": {"tabor": tabor["seconds"], "cascade": cascade["seconds"]},
                                      "peak_memory_mb": {"tabor": tabor["peak_rss_mb"], "cascade": cascade["peak_rss_mb"]},
                                      "cascade": figures_of_cascade}, section, results_dir=args.results_dir)
            print(section)
            return 0
        previous = json.loads((args.results_dir / "speed.json").read_text())
        if previous.get("model_id") != args.model:
            raise SystemExit(f"speed.json was measured on {previous.get('model_id')}, not {args.model}")
        sources = previous.get("ratio_sources") or {k: previous["command"] for k in previous["ratios"]}
        figures = {k: v for k, v in previous.items()
                   if k not in ("benchmark", "created", "command", "machine", "versions", "git_commit")}
        figures["ratios"] = previous["ratios"] | {"tabor_over_cascade": ratio}
        figures["ratio_sources"] = sources | {"tabor_over_cascade": f"{' '.join(['python', *sys.argv])} "
                                                                    f"(threads {args.threads})"}
        figures["seconds"] = previous["seconds"] | {"tabor_for_cascade_ratio": tabor["seconds"],
                                                    "cascade": cascade["seconds"]}
        figures["peak_memory_mb"] = previous["peak_memory_mb"] | {"cascade": cascade["peak_rss_mb"]}
        figures["cascade"] = figures_of_cascade
        old_table = (args.results_dir / "speed.md").read_text().split("\n\n", 1)[1]
        old_table = old_table.split("\n\n## Cascade", 1)[0].replace(" Cascade (`--mode fast`) not built yet.", "")
        old_table = old_table.replace("| tabor_over_cascade | - |",
                                                                     f"| tabor_over_cascade | {ratio:.2f} |")
        table = (f"Figures other than the cascade's: `{previous['command']}` at {previous['created']}, commit "
                 f"{previous['git_commit']}.\n\n{old_table.strip()}\n\n" + section)
        write_results("speed", figures, table, results_dir=args.results_dir)
        print(table)
        return 0

    device = args.device
    cascade_settings = {"cascade": {"ranker": args.ranker, "top_k": args.top_k}}

    def one_round() -> dict[str, dict]:
        measured = {"ni": run(model_path, data_path, "ni", {}, args.threads, device)}
        raw_before = run(model_path, data_path, "raw", {}, args.threads, device)  # just before NC: see measure
        measured["nc"] = run(model_path, data_path, "nc", {}, args.threads, device, raw_before=raw_before)
        measured |= {name: run(model_path, data_path, name, {}, args.threads, device) for name in ("tabor", "ncpp")}
        measured["nc_sequential"] = run(model_path, data_path, "nc", {"slots": 1}, args.threads, device)
        measured["cascade"] = run(model_path, data_path, "cascade", cascade_settings, args.threads, device)
        return measured

    # each round measures every detector back to back; ratios are taken within a round and the
    # median over rounds is reported, so a slow spell of a shared host skews one round, not a ratio
    rounds = [one_round() for _ in range(args.rounds)]
    per_round = [round_ratios(r) for r in rounds]
    ratios = {k: float(np.median([r[k] for r in per_round])) for k in per_round[0]}
    # the round whose NC time is the median stands for the table (seconds, memory, flags)
    middle = sorted(rounds, key=lambda r: r["nc"]["seconds"])[len(rounds) // 2]
    reports = {name: middle[name] for name in ("ni", "nc", "tabor", "ncpp")}
    sequential, cascade = middle["nc_sequential"], middle["cascade"]
    rows = cascade_rows(args.zoo, [args.model, *more], args.threads, {args.model: (reports["tabor"], cascade)}, device,
                        cascade_settings)
    nc = reports["nc"]
    scan_rate = nc["restoration_images"] / nc["seconds"]
    default_scan = reports["ni"]["seconds"] + reports["tabor"]["seconds"]
    gpu = device != "cpu"
    labelled = [*reports.items(), ("nc one class at a time", sequential), (f"cascade ({args.ranker} + tabor on suspects)", cascade)]
    rows_table = [[name, f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", *([f"{r['peak_gpu_mb']:.0f}"] if gpu else []),
                   r["flagged"]] for name, r in labelled]
    table = markdown_table(["detector", "seconds", "peak RSS MB", *(["peak GPU MB"] if gpu else []), "flagged"],
                           rows_table)
    table += "\n\n" + markdown_table(["ratio", "value", *(["per round"] if len(rounds) > 1 else [])],
                                      [[k, f"{v:.2f}", *([", ".join(f"{r[k]:.2f}" for r in per_round)] if len(rounds) > 1 else [])]
                                       for k, v in ratios.items()])
    if len(rounds) > 1:
        table += (f"\n\n{len(rounds)} rounds; ratios: median over rounds, each taken within its round; seconds and "
                  "memory above: the round with the median NC time.")
    table += f"\n\nDefault scan (ni + tabor): {default_scan:.1f} s. NC restoration {scan_rate:.0f} images/s vs raw best " \
             f"{nc['raw_best_images_per_second']:.0f} images/s ({nc['raw_precision']}; the mean of " \
             f"{nc['raw_best_images_per_second_before']:.0f} before the scan and " \
             f"{nc['raw_best_images_per_second_after']:.0f} after it; scan_over_raw_after_only: the ratio to the " \
             f"second alone, as this file reported it before).\n\n## Cascade (`--mode fast`)\n\n" + cascade_table(rows)
    figures = {
        "model_id": args.model, "device": device, "threads": args.threads, "ratios": ratios,
        "seconds": {k: r["seconds"] for k, r in reports.items()}
        | {"nc_sequential": sequential["seconds"], "default_scan_ni_tabor": default_scan, "cascade": cascade["seconds"]},
        "peak_memory_mb": {k: r["peak_rss_mb"] for k, r in reports.items()} | {"cascade": cascade["peak_rss_mb"]},
        "peak_gpu_memory_mb": ({k: r["peak_gpu_mb"] for k, r in labelled} if gpu else None),
        "cascade": cascade_figures(args.threads, rows),
        "rounds": len(rounds), "ratios_by_round": per_round,
        "details": reports | {"nc_sequential": sequential, "cascade": cascade},
    }
    name = args.name if args.name != "speed" else ("speed" if not gpu else f"speed_{device}")
    write_results(name, figures, table, results_dir=args.results_dir)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
