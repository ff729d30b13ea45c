"""What TABOR's anomaly metric (eq. 5) measures on a zoo, term by term.

    python benchmarks/tabor_metric.py [--zoo zoo/fashion-mnist] [--name tabor_metric]

Eq. (5) scores class t by A = log((||M_t||_1 - ||M-hat_t||_1) / d^2) - log(acc_att): a real trigger
should lose little to the eq. (4) pruning and keep a high attack success. This benchmark reads the
terms of every class of every zoo model from TABOR's scan (default settings, seed 0; the scans
`benchmarks/unlearning.py` caches, run here when missing) and reports:

- how much of each restored mask the pruning removes (1 - ||M-hat|| / ||M||), for the true
  target classes and for the others;
- the range of the restored triggers' attack success (the -log(acc_att) term);
- the correlation over all classes of A with log ||M||_1, the restored mask's size alone;
- the verdicts of three rules on the same restorations, MAD on the low tail at the detector's
  threshold: eq. (5) as shipped, MAD on log ||M||_1 (eq. 5 without pruning or attack success),
  and MAD on ||M||_1 (Neural Cleanse's rule applied to TABOR's masks).

It explains the detector's verdicts; it does not change them. Writes
benchmarks/results/<name>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from benchmarks.unlearning import restore  # noqa: E402
from scanner.anomaly import flag, mad_anomaly_index  # noqa: E402
from scanner.detectors.tabor import TaborSettings, tabor_anomaly_index  # noqa: E402
from scanner.zoo import load_manifest  # noqa: E402

RULES = ("eq5", "mad_log_l1", "mad_l1")


def rule_flags(statistics: dict[str, np.ndarray], settings: TaborSettings) -> dict[str, list[int]]:
    """The classes each rule flags on one model's TABOR statistics: eq. (5) exactly as the detector
    indexes it (its MAD floor included), the two alternatives with the bare MAD."""
    l1 = statistics["mask_l1"]
    indices = {"eq5": tabor_anomaly_index(statistics["tabor_metric"], settings),
               "mad_log_l1": mad_anomaly_index(np.log(l1), tail="low"),
               "mad_l1": mad_anomaly_index(l1, tail="low")}
    return {rule: flag(indices[rule], settings.threshold) for rule in RULES}


def model_row(zoo: Path, entry: dict) -> dict:
    """One model's TABOR terms per class and each rule's flags."""
    detector = json.loads(restore(zoo, entry).read_text())["detectors"]["tabor"]
    statistics = {k: np.asarray(v, dtype=np.float64) for k, v in detector["statistics"].items()}
    targets = sorted({int(t["target"]) for t in entry["ground_truth"]}) if entry["trojaned"] else []
    flags = rule_flags(statistics, TaborSettings(**detector["settings"]))
    if flags["eq5"] != detector["flagged_classes"]:
        raise SystemExit(f"{entry['id']}: eq. (5) recomputed flags {flags['eq5']}, the scan flagged "
                         f"{detector['flagged_classes']}")
    return {"model_id": entry["id"], "targets": targets, "flags": flags,
            "statistics": {k: v.round(4).tolist() for k, v in statistics.items()}}


def summary(rows: list[dict]) -> dict:
    """Pruned share, attack success, correlation and each rule's catches over all rows."""
    metric, log_l1, pruned_target, pruned_other, success = [], [], [], [], []
    for row in rows:
        s = {k: np.asarray(v) for k, v in row["statistics"].items()}
        pruned = 1 - s["refined_mask_l1"] / np.maximum(s["mask_l1"], 1e-9)
        metric += s["tabor_metric"].tolist()
        log_l1 += np.log(s["mask_l1"]).tolist()
        success += s["attack_success"].tolist()
        for k, share in enumerate(pruned):
            (pruned_target if k in row["targets"] else pruned_other).append(float(share))
    trojans = [r for r in rows if r["targets"]]
    cleans = [r for r in rows if not r["targets"]]
    rules = {rule: {"caught": sum(set(r["targets"]) <= set(r["flags"][rule]) for r in trojans),
                    "trojans": len(trojans),
                    "clean_flagged": sum(bool(r["flags"][rule]) for r in cleans), "clean": len(cleans),
                    "extra_classes_on_trojans": sum(len(set(r["flags"][rule]) - set(r["targets"])) for r in trojans)}
             for rule in RULES}
    return {"correlation_eq5_log_l1": float(np.corrcoef(metric, log_l1)[0, 1]),
            "pruned_share_target": {"median": float(np.median(pruned_target)), "min": float(np.min(pruned_target)),
                                    "max": float(np.max(pruned_target))},
            "pruned_share_other": {"median": float(np.median(pruned_other)), "min": float(np.min(pruned_other)),
                                   "max": float(np.max(pruned_other))},
            "attack_success": {"min": float(np.min(success)), "median": float(np.median(success))},
            "rules": rules}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--name", default="tabor_metric")
    args = parser.parse_args()
    manifest = load_manifest(args.zoo)
    if not manifest:
        raise SystemExit(f"no zoo manifest in {args.zoo}: build it with `trojanscan zoo build`")
    rows = [model_row(args.zoo, entry) for entry in manifest["models"]]
    figures = summary(rows)
    table = markdown_table(
        ["model", "targets", "eq. (5) flags", "MAD on log L1", "MAD on L1", "target L1", "median L1 of others",
         "target pruned share"],
        [[r["model_id"], r["targets"], r["flags"]["eq5"], r["flags"]["mad_log_l1"], r["flags"]["mad_l1"],
          ", ".join(f"{r['statistics']['mask_l1'][t]:.1f}" for t in r["targets"]) or "-",
          f"{np.median([v for k, v in enumerate(r['statistics']['mask_l1']) if k not in r['targets']]):.1f}",
          ", ".join(f"{1 - r['statistics']['refined_mask_l1'][t] / r['statistics']['mask_l1'][t]:.2f}"
                    for t in r["targets"]) or "-"]
         for r in rows])
    rules = markdown_table(
        ["rule on TABOR's restorations", "trojans caught (right targets)", "clean models flagged",
         "extra classes on trojans"],
        [[rule, f"{v['caught']}/{v['trojans']}", f"{v['clean_flagged']}/{v['clean']}", v["extra_classes_on_trojans"]]
         for rule, v in figures["rules"].items()])
    p_t, p_o, acc = figures["pruned_share_target"], figures["pruned_share_other"], figures["attack_success"]
    text = (f"{table}\n\n{rules}\n\nCorrelation over all classes of eq. (5) with log ||M||_1: "
            f"{figures['correlation_eq5_log_l1']:.3f}. Share of the restored mask the eq. (4) pruning removes: "
            f"true targets median {p_t['median']:.2f} ({p_t['min']:.2f}-{p_t['max']:.2f}), other classes median "
            f"{p_o['median']:.2f} ({p_o['min']:.2f}-{p_o['max']:.2f}). Restored triggers' attack success: min "
            f"{acc['min']:.3f}, median {acc['median']:.3f}.")
    write_results(args.name, {"zoo": str(args.zoo), "summary": figures, "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
