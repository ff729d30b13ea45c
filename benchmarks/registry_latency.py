"""Registry event to verdict, minus the detectors' own time, for versions registered at once.

    python benchmarks/registry_latency.py [--versions 20] [--one-at-a-time 3] [--compare-cold]

Starts the real stack on loopback (MLflow server, Prefect server, receiver, flow worker; the
same launcher the end-to-end tests use), registers N versions of one model at the same moment
with the policy requesting a scan on registration (`model_version.created` webhook), and waits
for every verdict. Per version: overhead = (time of the verdict tag - version creation time)
- the detectors' seconds recorded in the scan run. The policy runs NeuronInspect only: the
detectors' time is subtracted anyway, and a short scan keeps the flows overlapping.

Two phases in one run, side by side: first `--one-at-a-time` versions, each registered after
the previous one's verdict (the overhead of one request on an idle stack), then `--versions`
registered at once (the target's case). Each version's time is split with the Prefect flow
run's state history: trigger (version created -> flow run created), split by the time the
Prefect API received the event into delivery (MLflow's webhook and the receiver) and automation,
itself split by the firing time Prefect records on its `prefect.automation.action.triggered`
event into evaluation (the trigger service takes the event and fires) and action (the
run-deployment action creates the flow run), queue (-> Pending: waiting for a worker slot, TROJANSCAN_WORKER_LIMIT),
start-up (Pending -> Running: the run's process starts and imports the flow), in-run other
(Running -> verdict, minus the detectors: download, sha256, loading and verifying the model,
report, MLflow logging, tags). `--compare-cold` first runs the same on a stack whose worker
starts every scan in a fresh interpreter (Prefect's runner) instead of forking it from the warm
parent (flows/warm_runner.py). Writes benchmarks/results/registry_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

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


def _wait_for_verdicts(client: Any, versions: list[str], timeout: float) -> None:
    """Poll with one search a second: the benchmark must not load the MLflow server it measures
    (a get per version per second was 20 requests a second during a burst)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {str(v.version): v.tags.get("trojanscan.status")
                  for v in client.search_model_versions("name = 'latency'")}
        if all(states.get(v) in ("clean", "infected", "error") for v in versions):
            return
        time.sleep(1)


def _state_times(prefect_client: Any, version: str) -> dict[str, float]:
    """Timestamps (epoch s) of the version's first scan flow run: created, Pending, Running."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(
        name=FlowRunFilterName(any_=[f"scan latency v{version}"])))
    if not runs:
        return {}
    run = min(runs, key=lambda r: r.created)
    times = {"created": run.created.timestamp()}
    for state in sorted(prefect_client.read_flow_run_states(run.id), key=lambda s: s.timestamp):
        times.setdefault(state.type.value.lower(), state.timestamp.timestamp())
    return times


def _events(api_url: str, names: list[str], **filters: Any) -> list[dict[str, Any]]:
    import httpx

    answer = httpx.post(f"{api_url}/events/filter", timeout=30,
                        json={"limit": 50, "filter": {"event": {"name": names}, **filters}})
    return answer.json().get("events", []) if answer.status_code == 200 else []


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every process: the services' child processes,
    such as PostgreSQL's backends, and this benchmark too), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _event_received(api_url: str, version: str) -> tuple[float, str] | None:
    """When the Prefect API took the version's `model_version.created` event (epoch s) and the
    event's id, or None."""
    events = _events(api_url, ["trojanscan.mlflow.model_version.created"],
                     resource={"id": [f"mlflow.model-version.latency.{version}"]})
    if not events:
        return None
    first = min(events, key=lambda e: _epoch(e["received"]))
    return _epoch(first["received"]), first["id"]


def _automation_fired(api_url: str, event_id: str) -> float | None:
    """When Prefect's trigger service fired the automation for the event (the `triggered` time
    its action event carries), or None."""
    events = _events(api_url, ["prefect.automation.action.triggered"],
                     related={"id": [f"prefect.event.{event_id}"]})
    return min(_epoch(e["occurred"]) for e in events) if events else None


def _measure(registry: Any, client: Any, prefect_client: Any, mode: str, version: str, api_url: str) -> dict[str, Any]:
    info = registry.get_version("latency", version)
    status = info.tags.get("trojanscan.status")
    row: dict[str, Any] = {"mode": mode, "version": version, "status": status}
    if status not in ("clean", "infected"):
        if info.tags.get("trojanscan.error"):  # why it failed, for the results file
            row["error"] = info.tags["trojanscan.error"]
        return row
    created = info.created_ms / 1000
    verdict_at = datetime.fromisoformat(info.tags["trojanscan.scanned_at"]).timestamp()
    run = client.get_run(info.tags["trojanscan.scan_run_id"])
    detectors = sum(v for k, v in run.data.metrics.items() if k.endswith(".seconds"))
    row.update(total=verdict_at - created, detectors=detectors, overhead=verdict_at - created - detectors)
    times = _state_times(prefect_client, version)
    if {"created", "pending", "running"} <= times.keys():
        row.update(trigger=times["created"] - created, queue=times["pending"] - times["created"],
                   startup=times["running"] - times["pending"], in_run_other=verdict_at - times["running"] - detectors)
        event = _event_received(api_url, version)
        if event is not None:  # the trigger, split: MLflow's delivery + receiver, then Prefect's automation
            received, event_id = event
            row.update(delivery=received - created, automation=times["created"] - received)
            fired = _automation_fired(api_url, event_id)
            if fired is not None:  # the automation, split: trigger evaluation, then the run-deployment action
                row.update(evaluation=fired - received, action=times["created"] - fired)
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    decided = [r for r in rows if "overhead" in r]
    overheads = [r["overhead"] for r in decided]
    summary: dict[str, Any] = {"versions": len(rows), "decided": len(decided), "overhead_seconds": {
        "p50": float(np.percentile(overheads, 50)) if overheads else None,
        "p95": float(np.percentile(overheads, 95)) if overheads else None,
        "max": float(max(overheads)) if overheads else None}}
    parts = ("trigger", "delivery", "automation", "evaluation", "action", "queue", "startup", "in_run_other",
             "detectors")
    summary["median_seconds"] = {part: float(np.median([r[part] for r in decided if part in r]))
                                 for part in parts if any(part in r for r in decided)}
    return summary


def _run(runner: str, poll: float, args: argparse.Namespace, zoo_dir: Path, manifest: dict[str, Any],
         cpu: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One fresh stack whose worker runs scans `runner` (warm: forked from a parent with the
    imports done; cold: Prefect's runner, a fresh interpreter per scan) and polls every `poll` s;
    both phases; one row per version. Fills cpu[runner] with the CPU seconds each service used
    from the burst's registration to its last verdict."""
    root = Path(tempfile.mkdtemp(prefix=f"trojanscan-latency-{runner}-poll{poll:g}-"))
    env = stack.base_env(root)
    ports = dict(zip(("mlflow", "prefect", "receiver", "postgres"), stack.free_ports(4)))
    tracking_uri = f"http://127.0.0.1:{ports['mlflow']}"
    api_url = f"http://127.0.0.1:{ports['prefect']}/api"
    (root / "policy.yaml").write_text(POLICY)
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_API_URL": api_url,
                "TROJANSCAN_POLICY": str(root / "policy.yaml"), "TROJANSCAN_WORKDIR": str(root / "work"),
                "TROJANSCAN_WEBHOOK_SECRET": SECRET, "TROJANSCAN_WATCH_INTERVAL": "3600",
                "TROJANSCAN_WORKER_POLL": f"{poll:g}", "TROJANSCAN_WORKER_WARM": str(int(runner == "warm")),
                "TROJANSCAN_WORKER_LIMIT": str(args.worker_limit)})
    services = []
    prefect_env, mlflow_store = env, None
    databases = tuple(name for name, db in (("prefect", args.prefect_db), ("mlflow", args.mlflow_db)) if db == "postgres")
    if databases:
        database, urls = stack.postgres_cluster(root, ports["postgres"], databases)
        services.append(database)
        if "prefect" in urls:
            prefect_env = env | {"PREFECT_API_DATABASE_CONNECTION_URL": urls["prefect"].replace("postgresql:", "postgresql+asyncpg:")}
        mlflow_store = urls.get("mlflow")
    services += [stack.mlflow_server(root, ports["mlflow"], env, mlflow_store),
                 stack.prefect_server(root, ports["prefect"], prefect_env),
                 stack.receiver(root, ports["receiver"], env), stack.worker(root, env)]
    try:
        for service in services:
            if service.process is None:  # the database cluster is already up
                service.start()
        import mlflow
        import onnx
        from mlflow import MlflowClient
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from scanner.registry import Registry

        client = MlflowClient(tracking_uri)
        client.create_webhook(name="trojanscan", url=f"http://127.0.0.1:{ports['receiver']}/webhooks/mlflow",
                              secret=SECRET, events=["model_version.created", "model_version_alias.created"])
        mlflow.set_tracking_uri(tracking_uri)
        # log the model files first (not timed), then create the versions
        sources = []
        for index in range(args.one_at_a_time + args.versions):
            entry = manifest["models"][index % len(manifest["models"])]
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(zoo_dir / "clean_samples.npz"))
                logged = mlflow.onnx.log_model(onnx.load(str(zoo_dir / entry["files"]["onnx"]["path"])), name="model",
                                               pip_requirements=["onnxruntime"],
                                               onnx_execution_providers=["CPUExecutionProvider"])
            sources.append((run.info.run_id, logged.model_uri, logged.model_id))
        client.create_registered_model("latency")
        time.sleep(20)  # let the worker settle after its start

        def register(source: tuple[str, str, str]) -> str:
            return str(client.create_model_version("latency", source[1], run_id=source[0], model_id=source[2]).version)

        registry = Registry(tracking_uri)
        phases: list[tuple[str, list[str]]] = [("one at a time", [])]
        for source in sources[:args.one_at_a_time]:
            phases[0][1].append(register(source))
            _wait_for_verdicts(client, phases[0][1][-1:], args.timeout)
        cpu_before = {service.name: service.cpu_seconds() for service in services}
        machine_before = _machine_busy_seconds()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            phases.append(("at once", list(pool.map(register, sources[args.one_at_a_time:]))))
        _wait_for_verdicts(client, phases[1][1], args.timeout)
        cpu[runner] = {"wall_seconds": time.monotonic() - started, "machine": _machine_busy_seconds() - machine_before,
                       **{service.name: service.cpu_seconds() - cpu_before[service.name] for service in services}}
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as prefect_client:
            return [_measure(registry, client, prefect_client, mode, version, api_url) | {"runner": runner, "poll": poll}
                    for mode, versions in phases for version in versions]
    finally:
        for service in reversed(services):
            service.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=20, help="versions registered at once")
    parser.add_argument("--one-at-a-time", type=int, default=3, help="versions registered one after another first")
    parser.add_argument("--poll", type=float, default=2.0, help="the worker's poll interval (TROJANSCAN_WORKER_POLL)")
    parser.add_argument("--worker-limit", type=int, default=int(os.environ.get("TROJANSCAN_WORKER_LIMIT", "4")),
                        help="scans the worker runs at once (TROJANSCAN_WORKER_LIMIT; each gets cores / limit threads)")
    parser.add_argument("--compare-cold", action="store_true",
                        help="first run the same on a stack whose worker spawns a fresh interpreter per scan "
                             "(Prefect's runner, TROJANSCAN_WORKER_WARM=0)")
    parser.add_argument("--prefect-db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the Prefect server's database (postgres: a throwaway local cluster, as in deploy/compose.yaml)")
    parser.add_argument("--mlflow-db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the MLflow server's backend store (postgres needs psycopg2: pip install -e .[postgres])")
    parser.add_argument("--name", default="registry_latency", help="results file name in benchmarks/results")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    from scanner.zoo import build_zoo

    zoo_dir = Path(tempfile.mkdtemp(prefix="trojanscan-latency-zoo-"))
    manifest = build_zoo("fashion-mnist", "smoke", zoo_dir)
    runners = ["cold", "warm"] if args.compare_cold else ["warm"]
    cpu: dict[str, dict[str, float]] = {}
    rows = [row for runner in runners for row in _run(runner, args.poll, args, zoo_dir, manifest, cpu)]

    def summaries(runner: str) -> tuple[dict[str, Any], dict[str, Any]]:
        mine = [r for r in rows if r["runner"] == runner]
        return (_summary([r for r in mine if r["mode"] == "one at a time"]),
                _summary([r for r in mine if r["mode"] == "at once"]))

    alone, at_once = summaries("warm")
    figures = {**at_once, "target_seconds": 15, "prefect_db": args.prefect_db, "worker_limit": args.worker_limit,
               "worker_poll_seconds": args.poll, "runner": "warm", "one_at_a_time": alone,
               "burst_cpu_seconds": cpu}
    if args.compare_cold:
        cold_alone, cold_at_once = summaries("cold")
        figures["cold"] = {"at_once": cold_at_once, "one_at_a_time": cold_alone}
        if at_once["overhead_seconds"]["p50"] and cold_at_once["overhead_seconds"]["p50"]:
            figures["cold_over_warm_p50"] = cold_at_once["overhead_seconds"]["p50"] / at_once["overhead_seconds"]["p50"]

    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f}" if key in row else "-"

    keys = ("total", "trigger", "delivery", "automation", "evaluation", "action", "queue", "startup", "in_run_other",
            "detectors", "overhead")
    table = markdown_table(["runner", "mode", "version", "status", "event to verdict s", "trigger s",
                            "of which delivery s", "of which automation s", "automation: evaluation s",
                            "automation: action s", "queue s",
                            "start-up s", "in-run other s", "detectors s", "overhead s"],
                           [[r["runner"], r["mode"], r["version"], r["status"], *(cell(r, k) for k in keys)]
                            for r in rows])
    for runner in runners:
        for label, summary in zip(("one at a time", "at once"), summaries(runner)):
            o, m = summary["overhead_seconds"], summary["median_seconds"]
            if o["p50"] is None:
                table += f"\n\n{runner} runner, {label}: no version was decided"
                continue
            table += (f"\n\n{runner} runner, {label}: {summary['decided']}/{summary['versions']} decided; overhead p50 "
                      f"{o['p50']:.1f} s, p95 {o['p95']:.1f} s, max {o['max']:.1f} s (target < 15 s each); medians: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in m.items()))
    for row in rows:
        if "error" in row:
            table += f"\n\n{row['runner']} runner, {row['mode']}, version {row['version']}: error: {row['error']}"
    for runner, used in cpu.items():
        table += (f"\n\n{runner} runner, CPU seconds used from the burst's registration to its last verdict "
                  f"({used['wall_seconds']:.1f} s of wall time, {os.cpu_count()} cores): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in used.items() if k not in ("wall_seconds", "machine"))
                  + (f"; the whole machine {used['machine']:.1f} of {used['wall_seconds'] * os.cpu_count():.1f} "
                     "CPU-s busy" if "machine" in used else ""))
    if "cold_over_warm_p50" in figures:
        table += f"\n\ncold / warm, p50 overhead of versions registered at once: {figures['cold_over_warm_p50']:.2f}"
    path = write_results(args.name, figures, table)
    print(table)
    print(f"written: {path}")
    return 0 if at_once["decided"] == args.versions and alone["decided"] == args.one_at_a_time else 1


if __name__ == "__main__":
    raise SystemExit(main())
