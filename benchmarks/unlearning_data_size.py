"""How many clean images a patch needs: CA and true-trigger ASR after unlearning, by the size of
the fine-tune set, on the demo's trojaned model.

    python benchmarks/unlearning_data_size.py [--zoo zoo/fashion-mnist-demo] [--sizes 400,1000,2000,5000,10000]
                                              [--seeds 0,1,2] [--jobs 2] [--name unlearning_data_size]

A registry's clean data is often a few hundred images (the demo logs 500 with each model, 400 of
them fine-tuned on), while `benchmarks/unlearning.py` patches with 20000. This sweep patches the
demo's trojaned model (`fm-square5-br`, the demo zoo, built here when missing, about 40 s) with
the default `UnlearnSettings` on seeded class-balanced subsets of the clean training images of each
size, and measures CA and the true trigger's ASR on the zoo's 9000 held-out test images, so the CA
drop is known to about 0.3 points rather than the several points 100 held-out images give. The
restoration (a TABOR scan, cached) and the measuring are `benchmarks/unlearning.py`'s. Each
patched model is then scanned again with the default scan (NeuronInspect + TABOR, seed 0, the
zoo's 500 clean samples), as the gate rescans a patched version before it may be promoted.

Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from benchmarks.unlearning import CA_DROP_TARGET, ASR_TARGET, finetune_set, patch_row, restore  # noqa: E402
from scanner.model_io import load_model  # noqa: E402
from scanner.scan import ScanSettings, scan_model  # noqa: E402
from scanner.unlearning import UnlearnSettings  # noqa: E402
from scanner.zoo import build_zoo, load_manifest, load_zoo_data  # noqa: E402

_JOB: dict = {}  # shared by every patch of one run; set before the worker processes fork


def _patch(size_and_seed: tuple[int, int]) -> dict:
    size, seed = size_and_seed
    torch.set_num_threads(1)
    out_dir = _JOB["zoo"] / "unlearned-by-size" / f"{size}-seed{seed}"
    row = patch_row(_JOB["zoo"], _JOB["entry"], _JOB["data"], finetune_set(_JOB["data"].train, size, seed),
                    UnlearnSettings(seed=seed), _JOB["references"], out_dir)
    rescan = scan_model(out_dir / f"{row['model_id']}.onnx", _JOB["zoo"] / "clean_samples.npz",
                        ScanSettings(seed=0, device="cpu")).to_json()
    return {"finetune_images_given": size, "seed": seed, **row, "rescan_verdict": rescan["verdict"],
            "rescan_flagged": {name: d["flagged_classes"] for name, d in rescan["detectors"].items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist-demo"))
    parser.add_argument("--sizes", default="400,1000,2000,5000,10000", help="fine-tune set sizes, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the subset and the fine-tune, comma-separated")
    parser.add_argument("--jobs", type=int, default=2, help="patches at once, each in its own process, one thread")
    parser.add_argument("--name", default="unlearning_data_size", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = load_manifest(args.zoo) or build_zoo("fashion-mnist", "demo", args.zoo, progress=print)
    trojans = [e for e in manifest["models"] if e["trojaned"]]
    data = load_zoo_data(manifest["dataset"], manifest["size"])
    references = {e["arch"]: load_model(args.zoo / e["files"]["onnx"]["path"]).module
                  for e in manifest["models"] if not e["trojaned"]}
    restore(args.zoo, trojans[0])  # before forking: the workers share its cache folder
    _JOB.update(zoo=args.zoo, entry=trojans[0], data=data, references=references)
    jobs = list(itertools.product([int(s) for s in args.sizes.split(",")], [int(s) for s in args.seeds.split(",")]))
    rows = []
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(_patch, jobs):
            rows.append(row)
            print(f"{row['finetune_images_given']:6d} images, seed {row['seed']}: CA {row['ca_before']:.4f} -> "
                  f"{row['ca_after']:.4f}, ASR {row['asr_before']:.4f} -> {row['asr_after']:.4f}, "
                  f"{row['seconds']:.0f} s", flush=True)
    sizes = sorted({r["finetune_images_given"] for r in rows})
    summary = []
    for size in sizes:
        group = [r for r in rows if r["finetune_images_given"] == size]
        drops = [r["ca_drop"] for r in group]
        summary.append({
            "finetune_images_given": size, "finetune_images": group[0]["finetune_images"],
            "validation_images": group[0]["validation_images"], "seeds": len(group),
            "ca_drop_mean": float(np.mean(drops)), "ca_drop_min": min(drops), "ca_drop_max": max(drops),
            "ca_target_met": sum(d <= CA_DROP_TARGET for d in drops),
            "asr_after_mean": float(np.mean([r["asr_after"] for r in group])),
            "asr_after_max": max(r["asr_after"] for r in group),
            "asr_target_met": sum(r["asr_after"] <= ASR_TARGET for r in group),
            "seconds_mean": float(np.mean([r["seconds"] for r in group])),
            "rescans_infected": sum(r["rescan_verdict"] != "clean" for r in group),
        })
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    table = markdown_table(
        ["clean images given", "fine-tuned / validating", "seeds", "CA drop mean (points)", "CA drop min-max",
         "CA within 1 point", "ASR after mean (%)", "ASR after max (%)", "ASR <= 2%", "rescan infected",
         "seconds a patch"],
        [[s["finetune_images_given"], f"{s['finetune_images']} / {s['validation_images']}", s["seeds"],
          pct(s["ca_drop_mean"]), f"{pct(s['ca_drop_min'])} to {pct(s['ca_drop_max'])}",
          f"{s['ca_target_met']}/{s['seeds']}", pct(s["asr_after_mean"]), pct(s["asr_after_max"]),
          f"{s['asr_target_met']}/{s['seeds']}", f"{s['rescans_infected']}/{s['seeds']}",
          f"{s['seconds_mean']:.0f}"] for s in summary])
    table += (f"\n\nModel `{trojans[0]['id']}` (CA before {pct(rows[0]['ca_before'])}%, ASR before "
              f"{pct(rows[0]['asr_before'])}%), default UnlearnSettings but the seed, CA and true-trigger ASR on "
              f"{len(data.evaluation)} held-out test images; 'rescan': the default scan (ni + tabor) of the "
              f"patched model on the zoo's clean samples, as the gate rescans a patched version (the source was "
              f"flagged on its target, class {trojans[0]['targets']}). Per seed:\n\n")
    table += markdown_table(
        ["clean images given", "seed", "CA after", "CA drop", "CA drop bound", "ASR after", "rounds", "seconds",
         "rescan", "rescan flags"],
        [[r["finetune_images_given"], r["seed"], pct(r["ca_after"]), pct(r["ca_drop"]), pct(r["ca_drop_upper_bound"]),
          pct(r["asr_after"]), sum("epoch_kept" in x for x in r["rounds"]), f"{r['seconds']:.0f}", r["rescan_verdict"],
          ", ".join(f"{name} {flags}" for name, flags in r["rescan_flagged"].items() if flags) or "-"]
         for r in rows])
    path = write_results(args.name, {"zoo": str(args.zoo), "model_id": trojans[0]["id"],
                                     "settings": UnlearnSettings().model_dump(), "rows": rows, "summary": summary},
                         table)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
