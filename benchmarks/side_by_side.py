"""What the benchmarks that scan each model in two variants, one after the other in one process
(weight_layout.py, precision.py), share: their command line, their MODEL:DETECTOR:PAIRS runs
resolved against the zoo, and their per-model ratios."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results_file import markdown_table, write_results
from scanner.zoo import load_manifest


@dataclass
class Run:
    zoo: Path
    entry: dict[str, Any]
    detector: str
    pairs: int


def parse_args(doc: str, default_runs: str, default_name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-root", type=Path, default=Path("zoo"))
    parser.add_argument("--runs", default=default_runs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=default_name)
    return parser.parse_args()


def start(doc: str, default_runs: str, default_name: str) -> tuple[argparse.Namespace, list[Run]]:
    """A benchmark's start: its command line, its runs resolved before any scan (a model the zoo
    lacks ends it with exit code 2 and one line on stderr), torch's threads set."""
    import torch

    args = parse_args(doc, default_runs, default_name)
    try:
        runs = resolve_runs(args.zoo_root, args.runs)
    except LookupError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(args.threads)
    return args, runs


def resolve_runs(zoo_root: Path, runs: str) -> list[Run]:
    """Each DATASET/MODEL:DETECTOR:PAIRS with its zoo entry; LookupError names a model the zoo lacks."""
    resolved = []
    for spec in runs.split(","):
        model, detector, pairs = spec.split(":")
        zoo, model_id = (zoo_root / model).parent, Path(model).name
        manifest = load_manifest(zoo)
        entry = next((e for e in manifest["models"] if e["id"] == model_id), None) if manifest else None
        if entry is None:
            raise LookupError(f"no model {model_id} in {zoo}: run benchmarks/build_zoo.py first")
        resolved.append(Run(zoo, entry, detector, int(pairs)))
    return resolved


def side_by_side_ratios(rows: list[dict[str, Any]], raw: dict[str, dict[str, dict[str, float]]], key: str,
                        before: str, after: str) -> tuple[dict[str, dict[str, float]], str]:
    """Rows carry `key` = before or after. Per model: scan seconds of `before` over `after` (summed
    over the pairs) and best raw images/s of `after` over `before` (raw[model][variant] = images/s
    by batch). Returns (ratios, table)."""
    ratios = {}
    for model_id in dict.fromkeys(r["model_id"] for r in rows):
        seconds = {v: sum(r["seconds"] for r in rows if r["model_id"] == model_id and r[key] == v) for v in (before, after)}
        best = {v: max(raw[model_id][v].values()) for v in (before, after)}
        ratios[model_id] = {f"scan_{before}_over_{after}": round(seconds[before] / seconds[after], 2),
                            f"raw_{after}_over_{before}": round(best[after] / best[before], 2)}
    table = markdown_table(
        ["model", f"scan seconds {before} / {after}", f"best raw images/s {after} / {before}"],
        [[m, *r.values()] for m, r in ratios.items()])
    return ratios, table


def write_side_by_side(args: argparse.Namespace, rows: list[dict[str, Any]], raw: dict[str, Any], rows_table: str,
                       key: str, before: str, after: str) -> int:
    """Print and write the result file: the rows' table, the ratios and the raw rates."""
    ratios, ratio_table = side_by_side_ratios(rows, raw, key, before, after)
    table = f"{rows_table}\n\n{ratio_table}\n\n{args.threads} threads; raw images/s per batch size: {raw}"
    path = write_results(args.name, {"threads": args.threads, "rows": rows, "raw_images_per_second": raw,
                                     "ratios": ratios}, table)
    print(table)
    print(f"written: {path}")
    return 0
