"""Registry events under faults: does any request get lost, scanned twice, or promoted wrongly?

    python benchmarks/faults.py [--events 500] [--seed 0]

Starts the real stack on loopback (MLflow server, Prefect server, receiver, flow worker; the
launcher the end-to-end tests use), then drives random registry events while a second thread
kills (SIGKILL, the whole process group) and restarts the receiver, the worker or the MLflow
server at random moments. Three registered models cover the three kinds of request:

- `faults-alias`: request alias `candidate`, target alias `champion` (webhooks);
- `faults-stage`: request stage `Staging`, target stage `Production` (the watcher's poll);
- `faults-new`: every new version is a request, target alias `champion` (webhooks).

The events: new versions (each with its own bytes, half of them trojaned), request aliases set,
versions moved to `Staging`, and target aliases / the `Production` stage set by hand on random
versions (the guard must undo those on versions that are not clean). An event whose registry
call fails while MLflow is down is retried until it lands, and counted once.

When the events are done the stack is left to settle (no more kills), then the registry is read:
- requests lost: versions that were requested (request alias set on them, moved to `Staging`,
  or created under `faults-new`) whose status is not clean / infected / error;
- double scans: finished scan runs beyond the first per (model sha256, settings);
- bad promotions: versions holding a target alias or stage whose status is not `clean`.
Beside them, request to verdict: seconds from each version's first request to its verdict tag
(p50 / p95 / max, and the five slowest with their request's clock time, to read beside the kill
log): how long a request waits when services die under it. Writes benchmarks/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from tests import stack  # noqa: E402

SECRET = "faults-benchmark-secret"
MODELS = ("faults-alias", "faults-stage", "faults-new")
POLICY = """\
defaults:
  detectors: [ni]
  threshold: 3.5
  max_scan_seconds: 120
  stale_claim_seconds: 30
models:
  faults-alias: {request: {alias: candidate}, target: {alias: champion}}
  faults-stage: {request: {stage: Staging}, target: {stage: Production}}
  faults-new: {request: {on_register: true}, target: {alias: champion}}
"""
TERMINAL = ("clean", "infected", "error")


def unique_onnx(source: Path, dest: Path, label: str) -> Path:
    """The same network with a metadata entry of its own: other bytes, so its own scan."""
    import onnx

    model = onnx.load(str(source))
    entry = model.metadata_props.add()
    entry.key, entry.value = "faults.copy", label
    onnx.save(model, str(dest))
    return dest


class Registry:
    """The benchmark's own MLflow calls: each retried until it lands (MLflow may be down)."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.failures = 0

    def call(self, function: Callable[..., Any], *args: Any, patience: float = 300, **kwargs: Any) -> Any:
        deadline = time.monotonic() + patience
        while True:
            try:
                return function(*args, **kwargs)
            except Exception:
                self.failures += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


class Killer(threading.Thread):
    """Kills one service at a random moment, waits, restarts it; until told to stop."""

    def __init__(self, services: dict[str, stack.Service], rng: random.Random, gap: tuple[float, float],
                 down: tuple[float, float]) -> None:
        super().__init__(daemon=True)
        self.services, self.rng, self.gap, self.down = services, rng, gap, down
        self.stop_event = threading.Event()
        self.kills: Counter[str] = Counter()
        self.log: list[str] = []

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(*self.gap)):
            name = self.rng.choice(sorted(self.services))
            service = self.services[name]
            service.stop(signal.SIGKILL)
            self.kills[name] += 1
            pause = self.rng.uniform(*self.down)
            self.log.append(f"{time.strftime('%H:%M:%S')} killed {name}, down {pause:.0f} s")
            time.sleep(pause)
            for attempt in range(5):
                try:
                    service.start()
                    break
                except RuntimeError:
                    time.sleep(2)
            else:
                self.log.append(f"{name} did not restart")


def drive_events(registry: Registry, sources: dict[str, list[tuple[str, str, str]]], count: int,
                 rng: random.Random, pace: float) -> tuple[Counter[str], dict[str, dict[str, float]], dict[str, set[str]]]:
    """Random registry events; returns counts per kind, the versions requested (each with the
    time, epoch s, of its first request) and all versions."""
    client = registry.client
    kinds: Counter[str] = Counter()
    requested: dict[str, dict[str, float]] = {name: {} for name in MODELS}
    versions: dict[str, list[str]] = {name: [] for name in MODELS}

    def request(name: str, version: str) -> None:
        requested[name].setdefault(version, time.time())

    def new_version(name: str) -> str | None:
        if not sources[name]:
            return None
        run_id, model_uri, model_id = sources[name].pop()
        created = registry.call(client.create_model_version, name, model_uri, run_id=run_id, model_id=model_id)
        versions[name].append(str(created.version))
        if name == "faults-new":
            request(name, str(created.version))
        return str(created.version)

    for name in MODELS:  # every model starts with two versions
        new_version(name)
        new_version(name)
    kinds["new version"] += 6
    while sum(kinds.values()) < count:
        roll = rng.random()
        name = rng.choice(MODELS)
        if roll < 0.15:
            if new_version(name) is not None:
                kinds["new version"] += 1
            continue
        version = rng.choice(versions[name])
        if roll < 0.45 and name == "faults-alias":
            registry.call(client.set_registered_model_alias, name, "candidate", version)
            request(name, version)
            kinds["request alias set"] += 1
        elif roll < 0.45 and name == "faults-stage":
            current = registry.call(client.get_model_version, name, version).current_stage
            if current in ("None", "Archived"):
                registry.call(client.transition_model_version_stage, name, version, "Staging")
                request(name, version)
                kinds["moved to Staging"] += 1
        elif roll < 0.75 and name in ("faults-alias", "faults-new"):
            registry.call(client.set_registered_model_alias, name, "champion", version)
            kinds["target alias set by hand"] += 1
        elif roll < 0.75 and name == "faults-stage":
            current = registry.call(client.get_model_version, name, version).current_stage
            if current != "Staging":  # a Staging version holds a request: moving it by hand would withdraw it
                registry.call(client.transition_model_version_stage, name, version, "Production")
                kinds["Production set by hand"] += 1
        else:  # a repeated request on a version already requested (an event delivered twice)
            again = sorted(requested[name])
            if name == "faults-alias" and again:
                registry.call(client.set_registered_model_alias, name, "candidate", rng.choice(again))
                kinds["request alias set again"] += 1
        time.sleep(rng.uniform(0.5 * pace, 1.5 * pace))
    return kinds, requested, {name: set(found) for name, found in versions.items()}


def settled(registry: Any, requested: dict[str, dict[str, float]], policy: Any) -> tuple[bool, Counter[str]]:
    """Every request decided and no target held by a version that is not clean."""
    from scanner.gate import holds_target

    states: Counter[str] = Counter()
    quiet = True
    for name in MODELS:
        model_policy = policy.for_model(name)
        for info in registry.versions(name):
            if info.version in requested[name]:
                states[info.status or "unscanned"] += 1
                quiet &= info.status in TERMINAL
            if holds_target(info, model_policy) and info.status != "clean":
                quiet = False
    return quiet, states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--versions", type=int, default=22, help="new versions available per registered model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pace", type=float, default=2.5,
                        help="mean seconds between events (each alias event starts a flow run: a process)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20, 50), metavar=("MIN", "MAX"))
    parser.add_argument("--down-for", type=float, nargs=2, default=(1, 10), metavar=("MIN", "MAX"))
    parser.add_argument("--settle", type=float, default=1800, help="seconds to wait for the stack to settle")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()

    from scanner.zoo import build_zoo

    root = Path(tempfile.mkdtemp(prefix="trojanscan-faults-"))
    zoo_dir = root / "zoo"
    manifest = build_zoo("fashion-mnist", "smoke", zoo_dir)
    env = stack.base_env(root)
    ports = dict(zip(("mlflow", "prefect", "receiver"), stack.free_ports(3)))
    tracking_uri = f"http://127.0.0.1:{ports['mlflow']}"
    (root / "policy.yaml").write_text(POLICY)
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
                "TROJANSCAN_POLICY": str(root / "policy.yaml"), "TROJANSCAN_WORKDIR": str(root / "work"),
                "TROJANSCAN_WEBHOOK_SECRET": SECRET, "TROJANSCAN_WATCH_INTERVAL": "30",
                "OMP_NUM_THREADS": "1"})
    services = {"mlflow": stack.mlflow_server(root, ports["mlflow"], env),
                "prefect": stack.prefect_server(root, ports["prefect"], env),
                "receiver": stack.receiver(root, ports["receiver"], env), "worker": stack.worker(root, env)}
    killer = Killer({k: services[k] for k in ("mlflow", "receiver", "worker")}, rng,
                    tuple(args.kill_every), tuple(args.down_for))
    try:
        for service in services.values():
            service.start()
        import mlflow
        import onnx

        from scanner.policy import load_policy
        from scanner.registry import Registry as ScannerRegistry

        bench = Registry(tracking_uri)
        bench.client.create_webhook(name="trojanscan", url=f"http://127.0.0.1:{ports['receiver']}/webhooks/mlflow",
                                    secret=SECRET, events=["model_version.created", "model_version_alias.created"])
        mlflow.set_tracking_uri(tracking_uri)
        entries = manifest["models"]
        sources: dict[str, list[tuple[str, str, str]]] = {name: [] for name in MODELS}
        print(f"logging {args.versions * len(MODELS)} model copies ...", flush=True)
        for name in MODELS:
            bench.client.create_registered_model(name)
            for index in range(args.versions):
                entry = entries[index % len(entries)]
                path = unique_onnx(zoo_dir / entry["files"]["onnx"]["path"], root / "copy.onnx", f"{name}-{index}")
                with mlflow.start_run() as run:
                    mlflow.log_artifact(str(zoo_dir / "clean_samples.npz"))
                    logged = mlflow.onnx.log_model(onnx.load(str(path)), name="model", pip_requirements=["onnxruntime"],
                                                   onnx_execution_providers=["CPUExecutionProvider"])
                sources[name].append((run.info.run_id, logged.model_uri, logged.model_id))
            rng.shuffle(sources[name])
        print(f"driving {args.events} events with kills ...", flush=True)
        events_started = time.monotonic()
        killer.start()
        kinds, requested, versions = drive_events(bench, sources, args.events, rng, args.pace)
        events_seconds = time.monotonic() - events_started
        killer.stop_event.set()
        killer.join()
        for service in services.values():  # whatever the killer left down comes back
            if service.process is None or service.process.poll() is not None:
                service.start()
        print(f"events done in {events_seconds:.0f} s; kills {dict(killer.kills)}; settling ...", flush=True)
        registry = ScannerRegistry(tracking_uri)
        policy = load_policy(root / "policy.yaml")
        settle_started = time.monotonic()
        while time.monotonic() - settle_started < args.settle:
            quiet, states = settled(registry, requested, policy)
            if quiet:
                break
            time.sleep(10)
        settle_seconds = time.monotonic() - settle_started
        figures = audit(registry, policy, requested, versions)
        figures.update(request_to_verdict(registry, requested))
    finally:
        killer.stop_event.set()
        for service in reversed(list(services.values())):
            service.stop()
    figures.update({
        "events": sum(kinds.values()), "event_kinds": dict(kinds), "kills": sum(killer.kills.values()),
        "kills_by_service": dict(killer.kills), "kill_log": killer.log, "seed": args.seed, "pace_seconds": args.pace,
        "registry_call_retries": bench.failures, "events_seconds": round(events_seconds, 1),
        "settle_seconds": round(settle_seconds, 1), "total_seconds": round(time.monotonic() - started, 1),
        "stack_dir": str(root),
    })
    rows = [[key, json.dumps(figures[key]) if isinstance(figures[key], dict) else figures[key]]
            for key in ("events", "event_kinds", "kills", "kills_by_service", "requests", "requests_lost",
                        "double_scans", "bad_promotions", "final_states", "scan_runs", "events_seconds",
                        "settle_seconds", "request_to_verdict_seconds", "slowest_requests")]
    table = markdown_table(["figure", "value"], rows)
    ok = figures["requests_lost"] == 0 and figures["double_scans"] == 0 and figures["bad_promotions"] == 0
    table += (f"\n\n{'PASS' if ok else 'FAIL'}: lost requests / double scans / bad promotions = "
              f"{figures['requests_lost']} / {figures['double_scans']} / {figures['bad_promotions']} "
              f"over {figures['events']} events and {figures['kills']} kills (target 0 / 0 / 0 over >= 500 events).")
    for detail in ("lost", "doubled", "bad"):
        if figures[f"{detail}_detail"]:
            table += f"\n\n{detail}: {figures[f'{detail}_detail']}"
    path = write_results("faults", figures, table)
    print(table)
    print(f"written: {path}")
    return 0 if ok else 1


def request_to_verdict(registry: Any, requested: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Seconds from each version's first request to its verdict tag: the spread, and the five
    slowest with the clock time of their request (to read beside the kill log)."""
    from datetime import datetime

    from scanner.registry import SCANNED_AT

    waits: dict[str, float] = {}
    requested_at: dict[str, float] = {}
    for name, first_requests in requested.items():
        for version, at in first_requests.items():
            scanned_at = registry.get_version(name, version).tags.get(SCANNED_AT)
            if scanned_at:
                label = f"{name} v{version}"
                waits[label] = datetime.fromisoformat(scanned_at).timestamp() - at
                requested_at[label] = at
    values = list(waits.values())
    slowest = sorted(waits, key=waits.get, reverse=True)[:5]
    return {"request_to_verdict_seconds": {
                "decided": len(values), "p50": round(float(np.percentile(values, 50)), 1) if values else None,
                "p95": round(float(np.percentile(values, 95)), 1) if values else None,
                "max": round(max(values), 1) if values else None},
            "slowest_requests": {label: {"seconds": round(waits[label], 1),
                                         "requested_at": time.strftime("%H:%M:%S", time.localtime(requested_at[label]))}
                                 for label in slowest}}


def audit(registry: Any, policy: Any, requested: dict[str, dict[str, float]], versions: dict[str, set[str]]) -> dict[str, Any]:
    """The three figures of benchmarks.md, read from the registry and the scan runs."""
    from scanner.gate import holds_target
    from scanner.registry import SETTINGS_HASH, SHA256

    final_states: Counter[str] = Counter()
    lost, bad = [], []
    for name in MODELS:
        model_policy = policy.for_model(name)
        for info in registry.versions(name):
            if info.version in requested[name]:
                final_states[info.status or "unscanned"] += 1
                if info.status not in TERMINAL:
                    lost.append(f"{name} v{info.version} ({info.status or 'unscanned'})")
            if holds_target(info, model_policy) and info.status != "clean":
                bad.append(f"{name} v{info.version} holds the target with status {info.status or 'unscanned'}")
    experiment = registry.experiment_id(policy.experiment)
    runs = registry.client.search_runs([experiment], max_results=5000)
    finished: Counter[tuple[str, str]] = Counter()
    attempts = Counter(run.info.status for run in runs)
    for run in runs:
        if run.info.status == "FINISHED":
            finished[(run.data.tags.get(SHA256, "?"), run.data.tags.get(SETTINGS_HASH, "?"))] += 1
    doubled = [f"{sha[:12]}… scanned {n} times" for (sha, _), n in finished.items() if n > 1]
    return {"requests": sum(len(v) for v in requested.values()), "requests_lost": len(lost),
            "double_scans": sum(n - 1 for n in finished.values() if n > 1), "bad_promotions": len(bad),
            "final_states": dict(final_states), "scan_runs": dict(attempts),
            "versions_total": sum(len(v) for v in versions.values()),
            "lost_detail": lost, "doubled_detail": doubled, "bad_detail": bad}


if __name__ == "__main__":
    raise SystemExit(main())
