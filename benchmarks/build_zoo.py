"""Build the ground-truth zoo and record its table (model, attack, CA, ASR, seconds).

    python benchmarks/build_zoo.py --dataset fashion-mnist --size full [--out zoo/fashion-mnist]

Writes benchmarks/results/zoo_<dataset>.json and .md (smoke builds write zoo_<dataset>_smoke).
Resumable: models already built with the same settings are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from scanner.cli import describe_attack  # noqa: E402
from scanner.zoo import build_zoo  # noqa: E402

FIELDS = ("id", "dataset", "arch", "seed", "trojaned", "attack", "targets", "clean_accuracy",
          "attack_success_rate", "seconds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion-mnist", "signs"], required=True)
    parser.add_argument("--size", choices=["smoke", "full"], default="full")
    parser.add_argument("--out", type=Path, help="zoo folder (default zoo/<dataset>[-smoke])")
    args = parser.parse_args()
    out = args.out or Path("zoo") / (args.dataset + ("-smoke" if args.size == "smoke" else ""))
    manifest = build_zoo(args.dataset, args.size, out, progress=lambda m: print(m, flush=True))

    models = [{key: entry[key] for key in FIELDS} | {"asr_per_trigger": entry["attack_success_rate_per_trigger"]}
              for entry in manifest["models"]]
    rows = [[m["id"], m["arch"], describe_attack(m["attack"]), ",".join(map(str, m["targets"])) or "-",
             f"{m['clean_accuracy']:.4f}",
             "-" if m["attack_success_rate"] is None else f"{m['attack_success_rate']:.4f}", f"{m['seconds']:.0f}"]
            for m in models]
    table = markdown_table(["model", "arch", "attack", "targets", "CA", "ASR", "seconds"], rows)
    failures = manifest["quality_failures"]
    table += "\n\n" + ("All trojaned models meet ASR >= 0.95 with CA within 1.5 points of the clean models "
                       "of their architecture." if not failures else "Below target:\n" + "\n".join(f"- {f}" for f in failures))
    name = f"zoo_{args.dataset}" + ("_smoke" if args.size == "smoke" else "")
    path = write_results(name, {"size": args.size, "zoo_dir": str(out), "models": models,
                                "quality_failures": failures}, table)
    print(table)
    print(f"written: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
