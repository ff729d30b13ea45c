"""Is NeuronInspect's miss on the zoo a matter of how the trojans were trained?

    python benchmarks/ni_training_regime.py [--regimes paper,zoo] [--name ni_training_regime]

The zoo's Fashion-MNIST CNNs are trained for 3 epochs with Adam at lr 1e-3 and 10% of the
training images poisoned. NeuronInspect's paper trained its MNIST models for 10 epochs with Adam
at lr 0.01 and an inject ratio of 0.01 (its Table 1). This script takes the zoo's specs of six
models (architecture `nc_mnist`, seeds, triggers, targets) and trains them under either regime, in memory, and scans each model with
NeuronInspect and the saliency hotspot detector at their defaults on the zoo's clean samples:

- `paper`: 10 epochs, lr 0.01, poison rate 0.01;
- `zoo`: 3 epochs, lr 1e-3, poison rate 0.1 (the zoo's own; reproduces the zoo's models, so its
  rows must match `detection.md` for the same ids and serve as the control).

Models: two clean (seeds 0 and 1) and four trojans with the triggers of the zoo's `fm-square3-br`,
`fm-square5-br`, `fm-checker4-br` and `fm-blob5-br`. About 6 minutes on 2 CPU cores.
Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from scanner.detectors.neuron_inspect import NeuronInspect  # noqa: E402
from scanner.detectors.saliency_hotspot import SaliencyHotspot  # noqa: E402
from scanner.training import TrainSettings, predict  # noqa: E402
from scanner.zoo import ZooModelSpec, attack_success_rates, load_zoo_data, train_zoo_model, zoo_specs  # noqa: E402

REGIMES = {  # epochs, Adam learning rate, poison rate
    "paper": (10, 0.01, 0.01),
    "zoo": (3, 1e-3, 0.1),
}
MODELS = ("fm-clean-cnn-s0", "fm-clean-cnn-s1", "fm-square3-br", "fm-square5-br", "fm-checker4-br", "fm-blob5-br")


def regime_specs(regime: str) -> list[ZooModelSpec]:
    """The zoo's own specs of MODELS (architecture, seed, triggers, targets) with the regime's
    training and poison rate."""
    epochs, lr, rate = REGIMES[regime]
    train = TrainSettings(epochs=epochs, lr=lr)
    zoo = {spec.id: spec for spec in zoo_specs("fashion-mnist", "full")}
    return [zoo[model_id].model_copy(update={
        "train": train,
        "attack": zoo[model_id].attack and zoo[model_id].attack.model_copy(update={"poison_rate": rate}),
    }) for model_id in MODELS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="paper,zoo")
    parser.add_argument("--name", default="ni_training_regime")
    args = parser.parse_args()
    data = load_zoo_data("fashion-mnist", "full")
    rows = []
    for regime in args.regimes.split(","):
        for spec in regime_specs(regime):
            started = time.perf_counter()
            model, _ = train_zoo_model(spec, data)
            model.eval()
            target = spec.attack.targets[0] if spec.attack else None
            row = {"regime": regime, "model_id": spec.id, "target": target,
                   "clean_accuracy": float((predict(model, data.evaluation.x) == data.evaluation.y).mean()),
                   "attack_success_rate": attack_success_rates(model, spec, data.evaluation)[0] if spec.attack else None}
            for detector in (NeuronInspect(), SaliencyHotspot()):
                result = detector.scan(model, data.clean_samples, data.num_classes)
                row[f"{detector.name}_flagged"] = result.flagged_classes
                row[f"{detector.name}_index_target"] = None if target is None else float(result.anomaly_index[target])
                row[f"{detector.name}_max_index"] = result.max_anomaly_index
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{regime:6s} {spec.id:16s} CA {row['clean_accuracy']:.4f} ASR {row['attack_success_rate']} "
                  f"ni {row['ni_flagged']} hotspot {row['hotspot_flagged']}", flush=True)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731

    def caught(row: dict, name: str) -> str:
        if row["target"] is None:
            return "false alarm" if row[f"{name}_flagged"] else "pass"
        return "caught" if row[f"{name}_flagged"] == [row["target"]] else (
            "caught + extra" if row["target"] in row[f"{name}_flagged"] else "missed")

    table = markdown_table(
        ["regime", "model", "target", "CA %", "ASR %", "NI flagged", "NI index (target)", "NI max index", "NI",
         "hotspot flagged", "hotspot index (target)", "hotspot"],
        [[r["regime"], r["model_id"], "-" if r["target"] is None else r["target"], f"{100 * r['clean_accuracy']:.2f}",
          "-" if r["attack_success_rate"] is None else f"{100 * r['attack_success_rate']:.2f}", r["ni_flagged"],
          fmt(r["ni_index_target"]), fmt(r["ni_max_index"]), caught(r, "ni"), r["hotspot_flagged"],
          fmt(r["hotspot_index_target"]), caught(r, "hotspot")] for r in rows])
    table += ("\n\nRegimes (epochs, Adam lr, poison rate): "
              + ", ".join(f"{k} {v}" for k, v in REGIMES.items() if k in args.regimes.split(","))
              + ". The zoo's own architecture (nc_mnist), seeds and triggers; NeuronInspect and hotspot at their "
              "default settings, seed 0, on the zoo's "
              f"{len(data.clean_samples)} clean samples; CA and ASR on the zoo's {len(data.evaluation)} evaluation images.")
    path = write_results(args.name, {"regimes": {k: REGIMES[k] for k in args.regimes.split(",")}, "rows": rows}, table)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
