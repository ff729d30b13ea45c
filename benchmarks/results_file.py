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
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


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
             f"({payload['machine']['cores']} cores, GPU: {payload['machine']['gpu']}), commit {payload['git_commit']}\n\n"
    (results_dir / f"{name}.md").write_text(header + table_markdown + "\n")
    return json_path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

