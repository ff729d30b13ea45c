"""Fuzz the model loader at a larger count than the test suite does (issue 8).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz_models.py --count 5000

Uses the mutators and the worker harness of tests/test_fuzz_models.py (same kinds in the same
proportions, seeded, so a run is reproducible; files beyond the test's 1040 are new ones), on the
Fashion-MNIST smoke zoo's clean model (built in a temporary folder unless --zoo names one).
Every file goes through `scanner.cli.scan_outcome` in worker processes with an address-space limit
and a per-file watchdog. Writes benchmarks/results/fuzz_models.{json,md}: counts per mutation kind
and outcome, seconds, the slowest file, the workers' peak RSS, and every file that failed open.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import test_fuzz_models as fuzz  # noqa: E402

from benchmarks.results_file import markdown_table, write_results  # noqa: E402


def scaled_counts(total: int) -> dict[str, int]:
    """The test's kinds in the test's proportions, `total` files in all (at least one each)."""
    base = sum(fuzz.COUNTS.values())
    return {kind: max(1, round(n * total / base)) for kind, n in fuzz.COUNTS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="files to make and scan")
    parser.add_argument("--workers", type=int, default=fuzz.WORKERS)
    parser.add_argument("--zoo", type=Path, default=None, help="an existing fashion-mnist smoke zoo folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuzz-models-") as tmp:
        scratch = Path(tmp)
        zoo = args.zoo
        if zoo is None:
            from scanner.zoo import build_zoo

            zoo = scratch / "zoo"
            build_zoo("fashion-mnist", "smoke", zoo)
        manifest = __import__("json").loads((zoo / "manifest.json").read_text())
        entry = next(m for m in manifest["models"] if m["attack"] is None)
        onnx_path, pt2_path = zoo / entry["files"]["onnx"]["path"], zoo / entry["files"]["pt2"]["path"]
        samples = np.load(zoo / "clean_samples.npz")
        keep = np.concatenate([np.flatnonzero(samples["y"] == k)[:5] for k in range(10)])
        np.savez(scratch / "clean5.npz", x=samples["x"][keep], y=samples["y"][keep])

        base = fuzz.make_base(onnx_path, pt2_path)
        cases, pool, seconds = fuzz.run_cases(base, scratch / "clean5.npz", [onnx_path, pt2_path],
                                              scratch / "cases", scaled_counts(args.count), workers=args.workers)
    summary, text = fuzz.summarise(cases, pool, seconds)
    print(text)
    failures = [{"kind": c.kind, "index": c.index, "detail": c.detail, "outcome": fuzz.judge(c),
                 "message": c.reply.get("message"), "stray_output": c.reply.get("stray", "")[:500]}
                for c in cases if fuzz.judge(c) not in ("exit2", "exit3", "loaded")]
    loaded = [{"kind": c.kind, "index": c.index, "detail": c.detail} for c in cases if fuzz.judge(c) == "loaded"]
    summary.update({
        "seed": fuzz.SEED, "workers": args.workers, "file_seconds_limit": fuzz.FILE_SECONDS,
        "memory_headroom_bytes": fuzz.MEMORY_HEADROOM,
        "loaded_share": round(len(loaded) / len(cases), 4), "failures": failures, "loaded": loaded,
    })
    outcomes = sorted(summary["outcomes"])
    rows = [[kind, sum(counter.values()), *(counter.get(o, 0) for o in outcomes)]
            for kind, counter in summary["per_kind"].items()]
    rows.append(["all", len(cases), *(summary["outcomes"][o] for o in outcomes)])
    table = markdown_table(["kind", "files", *outcomes], rows)
    table += (f"\n\n{len(cases)} files in {seconds:.0f} s with {args.workers} workers; slowest file "
              f"{summary['max_seconds_per_file']} s ({summary['slowest']}); peak worker RSS {summary['max_rss_mib']} MiB; "
              f"failures (crash, hang, memory, code ran, stray output, bad message): {len(failures)}; "
              f"still loaded (harmless mutation): {len(loaded)}.")
    print(write_results("fuzz_models", summary, table))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
