"""Writes a benchmark's figures as `benchmarks/results/<name>.json` and its table as `.md`,
with the keys every result file has (shared/specs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("trojanscan", "torch", "numpy", "onnx", "onnxruntime-gpu", "onnx2torch", "mlflow", "prefect")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "speed_probe": speed_probe()}


def speed_probe() -> dict[str, float]:
    """How fast this host is right now, taken when the results are written: the same shared
    machine has run the same work at half the speed on another day (HISTORY.md), so results
    of different runs compare only with this beside them. Best of three: a pure-Python loop
    of one million additions (ms) and a 256x256 float32 matmul, 50 times on one thread (GFLOP/s)."""
    import time

    def loop() -> float:
        started, total = time.perf_counter(), 0
        for i in range(1_000_000):
            total += i
        return time.perf_counter() - started

    probe = {"python_loop_ms": round(1000 * min(loop() for _ in range(3)), 1)}
    try:
        import torch
    except ImportError:
        return probe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.rand(256, 256)

        def matmuls() -> float:
            started = time.perf_counter()
            for _ in range(50):
                a @ a
            return time.perf_counter() - started
        probe["matmul_gflops_1_thread"] = round(50 * 2 * 256 ** 3 / min(matmuls() for _ in range(3)) / 1e9, 1)
    finally:
        torch.set_num_threads(threads)
    return probe


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    if os.environ.get("TROJANSCAN_GIT_COMMIT"):  # a copy of the tree without .git (the GPU machine)
        return os.environ["TROJANSCAN_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_results(name: str, figures: dict[str, Any], table_markdown: str,
                  results_dir: Path = RESULTS_DIR) -> Path:
    """Write `<name>.json` (common keys + figures) and `<name>.md`; return the JSON path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "git_commit": git_commit(),
        **figures,
    }
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# {name}\n\n`{payload['command']}` at {payload['created']} on {payload['machine']['cpu']} " \
             f"({payload['machine']['cores']} cores, GPU: {payload['machine']['gpu']}), commit {payload['git_commit']}; " \
             f"speed probe at the end: {_describe(payload['machine']['speed_probe'])}\n\n"
    (results_dir / f"{name}.md").write_text(header + table_markdown + "\n")
    return json_path


def _describe(probe: dict[str, float]) -> str:
    parts = [f"Python loop {probe['python_loop_ms']} ms"]
    if "matmul_gflops_1_thread" in probe:
        parts.append(f"matmul {probe['matmul_gflops_1_thread']} GFLOP/s on 1 thread")
    return ", ".join(parts)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

