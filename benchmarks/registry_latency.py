"""Registry event to verdict, minus the detectors' own time, for versions registered at once.

    python benchmarks/registry_latency.py [--versions 20]

Starts the real stack on loopback (MLflow server, Prefect server, receiver, flow worker; the
same launcher the end-to-end tests use), registers N versions of one model at the same moment
with the policy requesting a scan on registration (`model_version.created` webhook), and waits
for every verdict. Per version: overhead = (time of the verdict tag - version creation time)
- the detectors' seconds recorded in the scan run. The policy runs NeuronInspect only: the
detectors' time is subtracted anyway, and a short scan keeps the flows overlapping.
Writes benchmarks/results/registry_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from tests import stack  # noqa: E402

SECRET = "latency-benchmark-secret"
POLICY = """\
defaults:
  detectors: [ni]
  threshold: 3.5
  request: {on_register: true}
  target: {alias: champion}
models:
  latency: {}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    from scanner.zoo import build_zoo

    root = Path(tempfile.mkdtemp(prefix="trojanscan-latency-"))
    zoo_dir = root / "zoo"
    manifest = build_zoo("fashion-mnist", "smoke", zoo_dir)
    env = stack.base_env(root)
    ports = {name: stack.free_port() for name in ("mlflow", "prefect", "receiver")}
    tracking_uri = f"http://127.0.0.1:{ports['mlflow']}"
    (root / "policy.yaml").write_text(POLICY)
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
                "TROJANSCAN_POLICY": str(root / "policy.yaml"), "TROJANSCAN_WORKDIR": str(root / "work"),
                "TROJANSCAN_WEBHOOK_SECRET": SECRET, "TROJANSCAN_WATCH_INTERVAL": "3600"})
    services = [stack.mlflow_server(root, ports["mlflow"], env), stack.prefect_server(root, ports["prefect"], env),
                stack.receiver(root, ports["receiver"], env), stack.worker(root, env)]
    try:
        for service in services:
            service.start()
        import mlflow
        import onnx
        from mlflow import MlflowClient

        from scanner.registry import Registry

        client = MlflowClient(tracking_uri)
        client.create_webhook(name="trojanscan", url=f"http://127.0.0.1:{ports['receiver']}/webhooks/mlflow",
                              secret=SECRET, events=["model_version.created", "model_version_alias.created"])
        mlflow.set_tracking_uri(tracking_uri)
        # log the model files first (not timed), then create all versions at once
        sources = []
        for index in range(args.versions):
            entry = manifest["models"][index % len(manifest["models"])]
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(zoo_dir / "clean_samples.npz"))
                logged = mlflow.onnx.log_model(onnx.load(str(zoo_dir / entry["files"]["onnx"]["path"])), name="model",
                                               pip_requirements=["onnxruntime"],
                                               onnx_execution_providers=["CPUExecutionProvider"])
            sources.append((run.info.run_id, logged.model_uri, logged.model_id))
        client.create_registered_model("latency")
        time.sleep(20)  # let the worker settle after its start
        with ThreadPoolExecutor(8) as pool:
            created = list(pool.map(lambda source: client.create_model_version("latency", source[1], run_id=source[0],
                                                                               model_id=source[2]), sources))
        versions = [str(v.version) for v in created]
        registry = Registry(tracking_uri)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            states = {v: registry.get_version("latency", v).tags.get("trojanscan.status") for v in versions}
            if all(s in ("clean", "infected", "error") for s in states.values()):
                break
            time.sleep(2)
        rows, overheads = [], []
        for version in versions:
            info = registry.get_version("latency", version)
            status = info.tags.get("trojanscan.status")
            verdict_at = datetime.fromisoformat(info.tags["trojanscan.scanned_at"]).timestamp() if status else None
            run = client.get_run(info.tags["trojanscan.scan_run_id"]) if "trojanscan.scan_run_id" in info.tags else None
            detector_seconds = sum(v for k, v in run.data.metrics.items() if k.endswith(".seconds")) if run else 0.0
            total = verdict_at - info.created_ms / 1000 if verdict_at else None
            overhead = total - detector_seconds if total is not None else None
            if overhead is not None and status in ("clean", "infected"):
                overheads.append(overhead)
            rows.append([version, status, f"{total:.1f}" if total else "-", f"{detector_seconds:.1f}",
                         f"{overhead:.1f}" if overhead is not None else "-"])
    finally:
        for service in reversed(services):
            service.stop()
    decided = len(overheads)
    figures = {"versions": args.versions, "decided": decided,
               "overhead_seconds": {"p50": float(np.percentile(overheads, 50)) if overheads else None,
                                    "p95": float(np.percentile(overheads, 95)) if overheads else None,
                                    "max": float(max(overheads)) if overheads else None},
               "target_seconds": 15}
    table = markdown_table(["version", "status", "event to verdict s", "detectors s", "overhead s"], rows)
    o = figures["overhead_seconds"]
    table += (f"\n\n{decided}/{args.versions} versions decided. Overhead p50 {o['p50']:.1f} s, p95 {o['p95']:.1f} s, "
              f"max {o['max']:.1f} s (target < 15 s each)." if overheads else "\n\nno version was decided")
    path = write_results("registry_latency", figures, table)
    print(table)
    print(f"written: {path}")
    return 0 if decided == args.versions else 1


if __name__ == "__main__":
    raise SystemExit(main())
