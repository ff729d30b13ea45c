"""Does NeuronInspect see a trojan once its trigger is on the images? An oracle, not a detector.

    python benchmarks/ni_oracle.py [--zoo zoo/fashion-mnist] [--name ni_oracle]

A scanner has only clean images, and on them NeuronInspect catches almost none of the zoo's
trojans (`detection_fm.md`). This script scans every trojan of a zoo twice with NeuronInspect at
its defaults: once on the zoo's clean samples, as a scan does, and once on the same samples with
the model's true trigger(s) stamped on every image not of its target class. For an attack with
several triggers, each is stamped on its own copy of the images and the copies are pooled. The
stamped images keep their true labels, so NeuronInspect's balanced draw still spans the source
classes. The second scan uses ground truth that no scan has, so it measures the method and not a
product setting. If the oracle catches what the clean scan misses, then the paper's features do
respond to an active trojan path, and on clean images that path is off. Random-position triggers
land somewhere else on every image, so no persistent map can form from them.

Prints one row per trojan (the target's anomaly index and the flagged classes, both ways) and
the catches. Writes benchmarks/results/<name>.json and .md. Seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from scanner.attacks import AttackSpec, build_triggers, triggered_set  # noqa: E402
from scanner.data import CleanData  # noqa: E402
from scanner.detectors.neuron_inspect import NeuronInspect  # noqa: E402
from scanner.model_io import load_model  # noqa: E402
from scanner.scan import place_on_device  # noqa: E402


def stamped_images(clean: CleanData, attack: AttackSpec, seed: int) -> CleanData:
    """Every trigger of the attack stamped on the clean images not of its target, true labels kept."""
    parts_x, parts_y = [], []
    for trigger, target in zip(build_triggers(attack, clean.x.shape[1]), attack.targets):
        parts_x.append(triggered_set(clean, trigger, target, seed).x)
        parts_y.append(clean.y[clean.y != target])
    return CleanData(np.concatenate(parts_x), np.concatenate(parts_y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="ni_oracle")
    args = parser.parse_args()
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    clean = CleanData.load_npz(args.zoo / "clean_samples.npz")
    rows = []
    for entry in manifest["models"]:
        if not entry["trojaned"]:
            continue
        loaded = load_model(args.zoo / entry["files"]["onnx"]["path"], check_data=clean.x[:64])
        module = place_on_device(loaded.module, torch.device("cpu"))
        attack = AttackSpec.model_validate(entry["attack"])
        row = {"model_id": entry["id"], "targets": entry["targets"]}
        for case, data in (("clean", clean), ("stamped", stamped_images(clean, attack, args.seed))):
            result = NeuronInspect(seed=args.seed).scan(module, data, manifest["num_classes"])
            index = np.asarray(result.anomaly_index)
            row[case] = {"target_index": [round(float(index[t]), 2) for t in entry["targets"]],
                         "flagged": result.flagged_classes,
                         "caught": set(entry["targets"]) <= set(result.flagged_classes)}
        rows.append(row)
        print(f"{entry['id']:28s} clean {row['clean']['target_index']} {row['clean']['flagged']}  "
              f"stamped {row['stamped']['target_index']} {row['stamped']['flagged']}", flush=True)
    caught = {case: sum(r[case]["caught"] for r in rows) for case in ("clean", "stamped")}
    table = markdown_table(
        ["model", "targets", "clean: target index", "clean: flagged", "stamped: target index", "stamped: flagged"],
        [[r["model_id"], r["targets"], r["clean"]["target_index"], r["clean"]["flagged"],
          r["stamped"]["target_index"], r["stamped"]["flagged"]] for r in rows])
    table += (f"\n\nCaught with the right target(s): on clean images {caught['clean']}/{len(rows)}, "
              f"with the true trigger stamped (oracle) {caught['stamped']}/{len(rows)}.")
    path = write_results(args.name, {"zoo": str(args.zoo), "seed": args.seed, "rows": rows,
                                     "summary": {"trojans": len(rows), "caught_clean": caught["clean"],
                                                 "caught_stamped": caught["stamped"]}}, table)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
