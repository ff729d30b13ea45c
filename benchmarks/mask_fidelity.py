"""How much of each true trigger a restoration can see, and TABOR's mask F1 against it.

    python benchmarks/mask_fidelity.py [--zoo zoo/fashion-mnist] [--models ID,...] [--name mask_fidelity]

A restored trigger is x' = (1 - m) x + m p. Where a true trigger's pixel equals the clean image's
pixel (a black check of a checkerboard on a black background, a white watermark stroke on a white
garment), stamping it changes nothing, so no restoration can tell whether it is part of the
trigger: its mask there gets no gradient from the classification loss and the size penalty
removes it. The ground-truth mask still counts those pixels, which caps the F1 a perfect
restoration can reach.

For every trojaned zoo model this prints:

- the share of the true mask that is *visible*: pixels where stamping the true trigger changes the
  clean images by at least `VISIBLE` on average (mean over channels and the zoo's clean samples,
  each image stamped as the attack stamps it, so random-position triggers average over positions);
- the F1 ceiling 2v / (1 + v) of a restored mask equal to the visible part (v = visible share);
- TABOR's restored mask (default settings, seed 0; the restorations that `benchmarks/unlearning.py`
  caches, run here when missing) scored three ways: binarised at 0.5 as `benchmarks/detection.py`
  does, by the TABOR paper's formula on the mask values (`scanner.metrics.paper_mask_f1`), and
  binarised against the visible part of the truth only.

It measures the benchmark's yardstick, not the detector: the issue's target (mean F1 >= 0.75)
stays judged on the whole true mask in `detection.md`. Writes benchmarks/results/<name>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.detection import truth_union  # noqa: E402
from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from benchmarks.unlearning import restore  # noqa: E402
from scanner import attacks  # noqa: E402
from scanner.data import CleanData  # noqa: E402
from scanner.metrics import mask_f1, paper_mask_f1  # noqa: E402
from scanner.zoo import load_manifest  # noqa: E402

VISIBLE = 0.1  # mean absolute change of a pixel (images in [0, 1]) for it to count as visible


def visibility(trigger: attacks.Trigger, x: np.ndarray, seed: int) -> np.ndarray:
    """Mean |stamped - clean| over channels and images, in the trigger's own (h, w) patch."""
    offsets = attacks.offsets_for(trigger, len(x), x.shape[2:], np.random.default_rng(seed))
    stamped = attacks.stamp(x, trigger, offsets)
    s = trigger.size
    change = np.zeros((s, s))
    for i, (row, col) in enumerate(offsets):
        change += np.abs(stamped[i, :, row:row + s, col:col + s] - x[i, :, row:row + s, col:col + s]).mean(0)
    return change / len(x)


def visible_truth(trigger: attacks.Trigger, x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(true mask, its visible part), in image coordinates for a fixed-position trigger and in
    patch coordinates for a random-position one (as the zoo's ground truth)."""
    visible = (visibility(trigger, x, seed) >= VISIBLE) & (trigger.mask > 0)
    if trigger.spec.position == "random":
        return trigger.mask > 0, visible
    hw = x.shape[2:]
    row, col = attacks.corner_offset(trigger.spec.position, trigger.size, hw)
    full = np.zeros(hw, bool)
    full[row:row + trigger.size, col:col + trigger.size] = visible
    return attacks.full_mask(trigger, hw) > 0, full


def model_rows(zoo: Path, entry: dict, x: np.ndarray) -> list[dict]:
    result_path = restore(zoo, entry)
    detector = json.loads(result_path.read_text())["detectors"]["tabor"]
    spec = attacks.AttackSpec(**entry["attack"])
    truths: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for index, (trigger, target) in enumerate(zip(attacks.build_triggers(spec, x.shape[1]), spec.targets)):
        truths.setdefault(target, []).append(visible_truth(trigger, x, seed=index))
    rows = []
    for target, pairs in sorted(truths.items()):
        truth, visible = truth_union([p[0] for p in pairs]), truth_union([p[1] for p in pairs])
        restored = np.load(result_path.parent / detector["artifacts"][str(target)]["mask_npy"])
        share = float(visible.sum() / truth.sum())
        rows.append({
            "model_id": entry["id"], "target": target, "shape": "+".join(t.shape for t in spec.triggers),
            "truth_pixels": int(truth.sum()), "visible_share": share, "f1_ceiling": 2 * share / (1 + share),
            "f1_binarised": mask_f1(restored, truth), "f1_paper": paper_mask_f1(restored, truth),
            "f1_binarised_visible": mask_f1(restored, visible) if visible.any() else 0.0,
            "restored_mask_l1": float(restored.sum()),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--models", default="", help="only these model ids")
    parser.add_argument("--name", default="mask_fidelity", help="results file name")
    args = parser.parse_args()
    manifest = load_manifest(args.zoo)
    if not manifest:
        print(f"no zoo at {args.zoo}: run benchmarks/build_zoo.py first", file=sys.stderr)
        return 2
    x = CleanData.load_npz(args.zoo / "clean_samples.npz").x
    only = set(filter(None, args.models.split(",")))
    rows = [row for entry in manifest["models"] if entry["trojaned"] and (not only or entry["id"] in only)
            for row in model_rows(args.zoo, entry, x)]
    means = {key: float(np.mean([r[key] for r in rows])) for key in
             ("visible_share", "f1_ceiling", "f1_binarised", "f1_paper", "f1_binarised_visible")}
    two = lambda v: f"{v:.2f}"  # noqa: E731
    table = markdown_table(
        ["model", "target", "trigger", "true pixels", "visible share", "F1 ceiling", "F1 (binarised)",
         "F1 (paper, mask values)", "F1 vs visible part", "restored mask L1"],
        [[r["model_id"], r["target"], r["shape"], r["truth_pixels"], two(r["visible_share"]), two(r["f1_ceiling"]),
          two(r["f1_binarised"]), two(r["f1_paper"]), two(r["f1_binarised_visible"]), f"{r['restored_mask_l1']:.1f}"]
         for r in rows])
    table += (f"\n\nMeans over {len(rows)} targets: visible share {two(means['visible_share'])}, F1 ceiling "
              f"{two(means['f1_ceiling'])}, TABOR F1 binarised {two(means['f1_binarised'])}, by the paper's formula "
              f"{two(means['f1_paper'])}, against the visible part {two(means['f1_binarised_visible'])}. "
              f"Visible: mean change >= {VISIBLE} when stamped, over {len(x)} clean samples.")
    path = write_results(args.name, {"zoo": str(args.zoo), "visible_threshold": VISIBLE, "rows": rows,
                                     "means": means}, table)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
