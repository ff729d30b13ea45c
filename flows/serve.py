"""Serve every flow as a deployment from one process (`trojanscan worker`): the simplest way to
run the product on one machine without work pools. `deploy/prefect.yaml` declares the same
deployments for work pools (`gpu` for scans and retraining, `cpu` for the watcher)."""

from __future__ import annotations

from prefect import serve
from prefect.events import DeploymentEventTrigger

from flows.locking import ensure_lock_limits
from flows.scan_file import scan_file
from flows.scan_version import scan_model_version
from flows.unlearn import unlearn_retrain
from flows.watcher import registry_watcher

REGISTRY_EVENTS = ["trojanscan.mlflow.model_version_alias.created", "trojanscan.mlflow.model_version.created"]


def registry_trigger() -> DeploymentEventTrigger:
    """Start `scan-model-version` for each event the receiver emits; plain-string parameters."""
    return DeploymentEventTrigger(
        name="mlflow-registry-event",
        expect=set(REGISTRY_EVENTS),
        match={"prefect.resource.id": "mlflow.model-version.*"},
        parameters={"name": "{{ event.payload.name }}", "version": "{{ event.payload.version }}",
                    "event": "{{ event.event }}", "alias": "{{ event.payload.alias }}"},
    )


def scan_threads(limit: int) -> int:
    """Torch threads per scan: the machine's cores shared among the `limit` scans that may run at
    once (TROJANSCAN_SCAN_THREADS overrides). Each scan taking every core made 4 concurrent
    scans on 2 cores spin 8 OpenMP threads: 25 CPU s for a burst of 20 NeuronInspect scans
    instead of 15 (benchmarks/registry_latency.py)."""
    import os

    configured = os.environ.get("TROJANSCAN_SCAN_THREADS")
    return int(configured) if configured else max(1, (os.cpu_count() or 1) // limit)


def skip_unused_certificate_parsing() -> bool:
    """Prefect builds a TLS context for every API client it creates, parsing certifi's ~140 CA
    certificates: 17 ms of CPU each, and a scan creates about ten clients (its engine, log and
    event workers, each lock release). py-spy put a fifth of the worker's CPU in a burst of 20
    scans there. With a plain-HTTP API the context is never used, so the processes started from
    here (the fork server and its scans, Prefect's runs) get a one-certificate file instead
    (PREFECT_API_SSL_CERT_FILE): 0.6 ms per client. An https API is left alone. Returns whether
    the file was set."""
    import os
    import re
    import tempfile
    from pathlib import Path

    import certifi
    from prefect.settings import PREFECT_API_URL

    if not (PREFECT_API_URL.value() or "").startswith("http://"):
        return False
    bundle = Path(certifi.where()).read_text()
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", bundle, re.S)
    if first is None:
        return False
    path = Path(tempfile.gettempdir()) / "trojanscan-plain-http-api-ca.pem"
    path.write_text(first.group(0))
    os.environ["PREFECT_API_SSL_CERT_FILE"] = str(path)
    return True


def serve_all(watch_interval: float | None = None, limit: int | None = None, poll: float | None = None,
              warm: bool | None = None) -> None:
    """`limit` bounds the flow runs at once (each scan is a process holding a model and torch);
    the rest wait in Prefect as scheduled runs. `poll` is how often the runner looks for them:
    Prefect's default (10 s) adds 5 s on average to every triggered scan, a query costs little.
    `warm` (default) runs the scans in processes forked from a parent that imported torch and
    the scanner once (flows/warm_runner.py); otherwise Prefect's runner spawns a fresh
    interpreter per scan, which pays the imports every time. Each scan gets `scan_threads(limit)`
    torch threads."""
    import os

    watch_interval = watch_interval or float(os.environ.get("TROJANSCAN_WATCH_INTERVAL", "60"))
    limit = limit or int(os.environ.get("TROJANSCAN_WORKER_LIMIT", "4"))
    poll = poll or float(os.environ.get("TROJANSCAN_WORKER_POLL", "2"))
    if warm is None:
        warm = os.environ.get("TROJANSCAN_WORKER_WARM", "1").lower() not in ("0", "false", "no")
    scan_deployment = scan_model_version.to_deployment(name="scan-model-version", triggers=[registry_trigger()])
    # no concurrency limit on the watcher: a watcher run left Pending or Running by a killed
    # worker held the limit's one slot until its lease ran out, and every later poll waited in
    # AwaitingConcurrencySlot (11 minutes without a poll in benchmarks/faults.py). Two watchers
    # at once are safe: the claim lock lets one of them scan a version, the other moves on.
    others = [registry_watcher.to_deployment(name="registry-watcher", interval=watch_interval),
              scan_file.to_deployment(name="scan-file"),
              unlearn_retrain.to_deployment(name="unlearn-retrain")]
    skip_unused_certificate_parsing()  # first: every Prefect client from here on is cheaper
    ensure_lock_limits()
    threads = scan_threads(limit)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # read by torch in Prefect's spawned runs
    if warm:
        from flows.warm_runner import WarmRunner

        WarmRunner("flows.scan_version:scan_model_version", scan_deployment.apply(), limit, poll, threads).start()
    else:
        others.insert(0, scan_deployment)
    serve(*others, limit=limit, query_seconds=poll)
