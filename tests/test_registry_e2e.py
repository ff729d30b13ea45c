"""End to end against the real stack on loopback: `mlflow server`, `prefect server start`, the
receiver (`trojanscan serve`) and the flow worker (`trojanscan worker`), started as users start
them. A registry change travels MLflow webhook -> receiver -> Prefect event -> deployment
trigger -> `scan-model-version` flow -> verdict, tags, scan run, promotion or block.

The policy here runs NeuronInspect alone with threshold 3.5: on the smoke zoo it gives the clean
model a largest index of 2.4 and the trojan 5.2 (target 7), and it takes a second. These tests
check the registry plumbing; how well the detectors separate models is measured by
`benchmarks/detection.py`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import stack

SECRET = "e2e-" + uuid.uuid4().hex
POLICY = """\
defaults:
  detectors: [ni]
  threshold: 3.5
  request: {alias: candidate}
  target: {alias: champion}
models:
  e2e-alias: {}
  e2e-twice: {}
  e2e-forged: {}
  e2e-nodata: {}
  e2e-broken: {}
  e2e-stage: {request: {stage: Staging}, target: {stage: Production}}
"""


def wait_for(condition: Callable[[], Any], timeout: float = 600, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Stack:
    def __init__(self, root: Path, zoo: tuple[Path, dict[str, Any]]) -> None:
        self.root = root
        self.zoo_dir, self.manifest = zoo
        self.env = stack.base_env(root)
        self.mlflow_port, self.prefect_port, self.receiver_port = stack.free_ports(3)
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        (root / "policy.yaml").write_text(POLICY)
        self.env.update({"MLFLOW_TRACKING_URI": self.tracking_uri,
                         "PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
                         "TROJANSCAN_POLICY": str(root / "policy.yaml"), "TROJANSCAN_WORKDIR": str(root / "work"),
                         "TROJANSCAN_WEBHOOK_SECRET": SECRET, "TROJANSCAN_WATCH_INTERVAL": "15"})
        self.mlflow = stack.mlflow_server(root, self.mlflow_port, self.env)
        self.prefect = stack.prefect_server(root, self.prefect_port, self.env)
        self.receiver = stack.receiver(root, self.receiver_port, self.env)
        self.worker = stack.worker(root, self.env)
        self.services = [self.mlflow, self.prefect, self.receiver, self.worker]

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver_port}/webhooks/mlflow"

    def registry(self) -> Any:
        from scanner.registry import Registry

        return Registry(self.tracking_uri)

    def register(self, name: str, model_id: str, with_clean_data: bool = True, model_file: Path | None = None) -> str:
        """Log a zoo model as an ONNX MLflow model in a run (with the clean samples) and register it."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment("e2e-models")
        entry = next(m for m in self.manifest["models"] if m["id"] == model_id)
        clean_samples = self.zoo_dir / "clean_samples.npz" if with_clean_data else None
        if model_file is None:
            return stack.register_onnx(self.zoo_dir / entry["files"]["onnx"]["path"], clean_samples, name)
        with mlflow.start_run():
            if clean_samples is not None:
                mlflow.log_artifact(str(clean_samples))
            folder = self.root / f"broken-{uuid.uuid4().hex[:6]}"
            folder.mkdir()
            (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
            (folder / "model.onnx").write_bytes(model_file.read_bytes())
            mlflow.log_artifacts(str(folder), "model")
            run_id = mlflow.active_run().info.run_id
        client = mlflow.MlflowClient()
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        return str(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version)

    def tags(self, name: str, version: str) -> dict[str, str]:
        return self.registry().get_version(name, version).tags

    def status(self, name: str, version: str) -> str | None:
        return self.tags(name, version).get("trojanscan.status")

    def scan_runs(self, name: str, version: str) -> list[Any]:
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name("trojanscan")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], f"tags.`trojanscan.model` = '{name}/{version}'")

    def receiver_stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.receiver_port}/stats", timeout=10) as answer:
            return json.loads(answer.read())

    def post(self, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(self.webhook_url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> Iterator[Stack]:
    live = Stack(tmp_path_factory.mktemp("stack"), fm_smoke_zoo)
    try:
        for service in (live.mlflow, live.prefect):
            service.start()
        live.receiver.start()
        live.worker.start()
        from mlflow import MlflowClient

        MlflowClient(live.tracking_uri).create_webhook(
            name="trojanscan", url=live.webhook_url, secret=SECRET,
            events=["model_version.created", "model_version_alias.created"])
        yield live
    except Exception:
        for service in live.services:
            print(f"--- {service.name} ---\n{service.log_tail()}")
        raise
    finally:
        for service in reversed(live.services):
            service.stop()


def test_alias_request_promotes_clean_and_blocks_trojan_then_guard(live: Stack) -> None:
    registry = live.registry()
    clean = live.register("e2e-alias", "fm-clean-s0")
    trojan = live.register("e2e-alias", "fm-square4-br")
    registry.set_alias("e2e-alias", "candidate", clean)
    wait_for(lambda: registry.alias_version("e2e-alias", "champion") == clean, what="clean version promoted")
    assert live.status("e2e-alias", clean) == "clean"
    # the promotion's own alias event needs no flow run: the receiver answers it from the registry
    wait_for(lambda: live.receiver_stats()["settled"] >= 1, timeout=60, what="promotion event settled by the receiver")

    registry.set_alias("e2e-alias", "candidate", trojan)
    wait_for(lambda: live.status("e2e-alias", trojan) == "infected", what="trojan blocked")
    tags = live.tags("e2e-alias", trojan)
    assert 7 in json.loads(tags["trojanscan.flagged_classes"])
    assert tags["trojanscan.verdict"] == "infected" and len(tags["trojanscan.model_sha256"]) == 64
    assert registry.alias_version("e2e-alias", "champion") == clean
    runs = live.scan_runs("e2e-alias", trojan)
    assert [r.info.run_id for r in runs] == [tags["trojanscan.scan_run_id"]]
    assert runs[0].data.metrics["ni.anomaly_index.class_7"] >= 3.5
    artifacts = {a.path for a in registry.client.list_artifacts(runs[0].info.run_id)}
    assert {"result.json", "report.html", "saliency"} <= artifacts

    # someone moves the target onto the trojan by hand: the alias event runs the guard
    registry.set_alias("e2e-alias", "champion", trojan)
    wait_for(lambda: "trojanscan.guard" in live.tags("e2e-alias", trojan), what="guard tag")
    assert registry.alias_version("e2e-alias", "champion") == clean


def test_stage_request_is_found_by_the_watcher(live: Stack) -> None:
    registry = live.registry()
    clean = live.register("e2e-stage", "fm-clean-s0")
    trojan = live.register("e2e-stage", "fm-square4-br")
    registry.set_stage("e2e-stage", clean, "Staging")
    registry.set_stage("e2e-stage", trojan, "Staging")  # no webhook exists for stages: only the poll sees these
    wait_for(lambda: registry.get_version("e2e-stage", clean).stage == "Production", what="stage promotion")
    wait_for(lambda: live.status("e2e-stage", trojan) == "infected", what="trojan blocked")
    assert registry.get_version("e2e-stage", trojan).stage == "Staging"


def _signed(delivery_id: str, timestamp: int, body: bytes, secret: str = SECRET) -> dict[str, str]:
    from scanner.webhooks import sign

    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": str(timestamp),
            "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body), "Content-Type": "application/json"}


def test_forged_stale_and_replayed_deliveries_are_rejected(live: Stack) -> None:
    version = live.register("e2e-forged", "fm-square4-br")
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "e2e-forged", "alias": "candidate", "version": version}}).encode()
    now = int(time.time())
    assert live.post(body, _signed(str(uuid.uuid4()), now, body, secret="wrong")) == 401  # forged
    tampered = _signed(str(uuid.uuid4()), now, body)
    assert live.post(body.replace(b"candidate", b"champion"), tampered) == 401  # body changed after signing
    assert live.post(body, _signed(str(uuid.uuid4()), now - 3600, body)) == 401  # stale
    replayed = _signed(str(uuid.uuid4()), now, body)
    assert live.post(body, replayed) == 200
    assert live.post(body, replayed) == 409  # replay of an accepted delivery
    # the one genuine delivery leads to exactly one scan; nothing else was queued
    wait_for(lambda: live.status("e2e-forged", version) == "infected", what="the genuine delivery's scan")
    time.sleep(8)
    assert len(live.scan_runs("e2e-forged", version)) == 1


def test_same_event_twice_gives_one_scan_run(live: Stack) -> None:
    version = live.register("e2e-twice", "fm-square4-br")
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "e2e-twice", "alias": "candidate", "version": version}}).encode()
    now = int(time.time())
    for _ in range(2):  # MLflow redelivering the same change under new delivery ids
        assert live.post(body, _signed(str(uuid.uuid4()), now, body)) == 200
    wait_for(lambda: live.status("e2e-twice", version) == "infected", what="scan")
    time.sleep(10)  # let the second flow run finish too
    assert len(live.scan_runs("e2e-twice", version)) == 1
    assert live.status("e2e-twice", version) == "infected"


def test_missing_clean_data_and_unloadable_model_end_as_error(live: Stack, tmp_path: Path) -> None:
    registry = live.registry()
    no_data = live.register("e2e-nodata", "fm-clean-s0", with_clean_data=False)
    registry.set_alias("e2e-nodata", "candidate", no_data)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07" + bytes(200))  # starts like ONNX, does not parse
    broken = live.register("e2e-broken", "fm-clean-s0", model_file=garbage)
    registry.set_alias("e2e-broken", "candidate", broken)
    wait_for(lambda: live.status("e2e-nodata", no_data) == "error", what="missing data error")
    wait_for(lambda: live.status("e2e-broken", broken) == "error", what="unloadable model error")
    assert "no clean data" in live.tags("e2e-nodata", no_data)["trojanscan.error"]
    assert "ONNX" in live.tags("e2e-broken", broken)["trojanscan.error"]
    assert registry.alias_version("e2e-nodata", "champion") is None
    assert registry.alias_version("e2e-broken", "champion") is None


class KillMlflowOnScan:
    """A reporter that kills the MLflow server when the detectors start and restarts it
    `down_for` seconds later."""

    def __init__(self, live: Stack, down_for: float) -> None:
        self.live, self.killed, self.down_for = live, False, down_for

    def progress(self, fraction: float, text: str) -> None:
        import threading

        if text == "scanning" and not self.killed:
            self.killed = True
            self.live.mlflow.stop()
            threading.Timer(self.down_for, self.live.mlflow.start).start()

    def scanned(self, *args: Any) -> None:
        pass

    def note(self, *args: Any) -> None:
        pass


def test_mlflow_server_going_away_mid_scan(live: Stack) -> None:
    """The gate runs in this process; the MLflow server is killed when the scan starts. Down for
    20 s with no retries left, the version ends `error`, never promoted; down for 3 s with the
    default retries, the outage is transient: one scan run, the verdict, the promotion."""
    from scanner.gate import scan_version
    from scanner.policy import load_policy

    registry = live.registry()
    (live.root / "vanish-policy.yaml").write_text(POLICY + "  e2e-vanish: {}\n")
    policy = load_policy(live.root / "vanish-policy.yaml")
    version = live.register("e2e-vanish", "fm-clean-s0")  # not in the worker's policy: only this test scans it
    registry.set_alias("e2e-vanish", "candidate", version)
    # down longer than the MLflow client's own HTTP retries (2, backoff ~6 s): the scan's next call fails
    reporter = KillMlflowOnScan(live, down_for=20.0)
    outcome = scan_version(registry, policy, "e2e-vanish", version, live.root / "work-vanish", reporter=reporter,
                           retries=0)
    assert reporter.killed
    assert outcome.status == "error" and not outcome.promoted
    stack.wait_http(f"{live.tracking_uri}/health", 60)
    assert live.status("e2e-vanish", version) == "error"
    assert "unreachable" in live.tags("e2e-vanish", version)["trojanscan.error"]
    assert registry.alias_version("e2e-vanish", "champion") is None

    retried = live.register("e2e-vanish", "fm-clean-s0")
    registry.set_alias("e2e-vanish", "candidate", retried)
    reporter = KillMlflowOnScan(live, down_for=3.0)
    outcome = scan_version(registry, policy, "e2e-vanish", retried, live.root / "work-vanish", reporter=reporter)
    assert reporter.killed
    assert (outcome.status, outcome.promoted) == ("clean", True), outcome.reasons
    assert registry.alias_version("e2e-vanish", "champion") == retried
    sha = live.tags("e2e-vanish", retried)["trojanscan.model_sha256"]
    finished = live.registry().client.search_runs(
        [registry.experiment_id("trojanscan")],
        filter_string=f"tags.`trojanscan.model_sha256` = '{sha}' and attributes.status = 'FINISHED'")
    assert len(finished) == 1
