"""The policy file, webhook verification, the receiver app, and the gate on a local SQLite MLflow
store (the real MLflow library, no server): idempotency, the guard, error paths."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from scanner.policy import PolicyError, load_policy
from scanner.registry import ModelReference, Registry, RegistryError
from scanner.unlearning import UnlearnSettings
from scanner.webhooks import ReplayGuard, WebhookRejected, sign, verify

POLICY = """\
defaults:
  detectors: [ni]
  threshold: 3.5
models:
  gate-model: {}
"""


# -- policy ---------------------------------------------------------------------------------------
def test_policy_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY + "  staged: {request: {stage: Staging}, target: {stage: Production}, auto_unlearn: true,\n"
                             "           unlearn: {epochs: 8, noise_patches: 0.2}}\n")
    policy = load_policy(path)
    assert policy.for_model("gate-model").request.alias == "candidate"
    staged = policy.for_model("staged")
    assert staged.request.stage == "Staging" and staged.auto_unlearn and staged.detectors == ("ni",)
    assert (staged.unlearn.epochs, staged.unlearn.noise_patches, staged.unlearn.share) == (8, 0.2, 0.5)
    assert policy.for_model("gate-model").unlearn == UnlearnSettings()
    assert policy.for_model("gate-model").settings_hash() == policy.for_model("staged").settings_hash()
    with pytest.raises(PolicyError, match="not in the policy"):
        policy.for_model("someone-else")


@pytest.mark.parametrize("text, message", [
    ("defaults: {threshold: -1}", "threshold"),
    ("defaults: {request: {alias: a, stage: Staging}}", "exactly one"),
    ("defaults: {request: {alias: x}, target: {alias: x}}", "differ"),
    ("models: {m: {detectors: [ni], colour: red}}", "models.m"),
    ("models: {m: {unlearn: {share: 0.9, noise_patches: 0.2}}}", "models.m: .*must stay below 1"),
    ("defaults: [1, 2", "not valid YAML"),
    ("- a list", "mapping"),
])
def test_bad_policy_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message) as caught:
        load_policy(path)
    assert "\n" not in str(caught.value)


def test_model_references() -> None:
    assert ModelReference.parse("models:/signs/3") == ModelReference("signs", version="3")
    assert ModelReference.parse("models:/signs@candidate") == ModelReference("signs", alias="candidate")
    assert ModelReference.parse("models:/signs/Production") == ModelReference("signs", stage="Production")
    with pytest.raises(RegistryError):
        ModelReference.parse("models:/a/b/c")


# -- webhooks -------------------------------------------------------------------------------------
def _headers(secret: str, body: bytes, timestamp: int | None = None, delivery: str | None = None) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": str(timestamp),
            "X-MLflow-Signature": sign(secret, delivery, timestamp, body)}


BODY = json.dumps({"entity": "model_version_alias", "action": "created",
                   "data": {"name": "m", "alias": "candidate", "version": "2"}}).encode()


def test_verify_accepts_a_genuine_delivery() -> None:
    delivery = verify("s3cret", _headers("s3cret", BODY), BODY)
    assert delivery.event_name == "trojanscan.mlflow.model_version_alias.created"
    assert delivery.data["version"] == "2"


@pytest.mark.parametrize("case", ["wrong secret", "tampered body", "stale", "future", "missing header"])
def test_verify_rejects(case: str) -> None:
    body, headers = BODY, _headers("s3cret", BODY)
    if case == "wrong secret":
        headers = _headers("guess", BODY)
    elif case == "tampered body":
        body = BODY.replace(b'"2"', b'"1"')
    elif case == "stale":
        headers = _headers("s3cret", BODY, timestamp=int(time.time()) - 301)
    elif case == "future":
        headers = _headers("s3cret", BODY, timestamp=int(time.time()) + 3600)
    else:
        headers.pop("X-MLflow-Signature")
    with pytest.raises(WebhookRejected):
        verify("s3cret", headers, body)


def test_replay_guard_survives_a_restart(tmp_path: Path) -> None:
    first = ReplayGuard(tmp_path / "seen.sqlite")
    assert first.first_time("abc") and not first.first_time("abc")
    assert not ReplayGuard(tmp_path / "seen.sqlite").first_time("abc")  # a restarted receiver still knows it


def test_receiver_app_emits_only_verified_new_deliveries(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from scanner.receiver import create_app

    emitted: list[Any] = []
    client = TestClient(create_app("s3cret", emitted.append, ReplayGuard(tmp_path / "seen.sqlite")))
    genuine = _headers("s3cret", BODY)
    assert client.post("/webhooks/mlflow", content=BODY, headers=genuine).status_code == 200
    assert client.post("/webhooks/mlflow", content=BODY, headers=genuine).status_code == 409
    assert client.post("/webhooks/mlflow", content=BODY, headers=_headers("nope", BODY)).status_code == 401
    tag_body = json.dumps({"entity": "model_version_tag", "action": "set", "data": {}}).encode()
    assert client.post("/webhooks/mlflow", content=tag_body, headers=_headers("s3cret", tag_body)).json()["status"] == "ignored"
    assert [d.data["version"] for d in emitted] == ["2"]

    def failing(delivery: Any) -> None:
        raise ConnectionError("prefect down")

    flaky = TestClient(create_app("s3cret", failing, ReplayGuard(tmp_path / "seen2.sqlite")))
    headers = _headers("s3cret", BODY)
    assert flaky.post("/webhooks/mlflow", content=BODY, headers=headers).status_code == 503
    healed = TestClient(create_app("s3cret", emitted.append, ReplayGuard(tmp_path / "seen2.sqlite")))
    assert healed.post("/webhooks/mlflow", content=BODY, headers=headers).status_code == 200  # MLflow's retry gets through


def test_receiver_acknowledges_settled_deliveries_and_emits_when_the_check_fails(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from scanner.receiver import create_app

    emitted: list[Any] = []
    settled = TestClient(create_app("s3cret", emitted.append, ReplayGuard(tmp_path / "a.sqlite"),
                                    settled=lambda delivery: f"v{delivery.data['version']} is clean"))
    answer = settled.post("/webhooks/mlflow", content=BODY, headers=_headers("s3cret", BODY))
    assert (answer.status_code, answer.json()["status"], emitted) == (200, "settled", [])
    assert settled.get("/stats").json()["settled"] == 1

    def unreachable(delivery: Any) -> str | None:
        raise ConnectionError("mlflow down")

    checked = TestClient(create_app("s3cret", emitted.append, ReplayGuard(tmp_path / "b.sqlite"), settled=unreachable))
    answer = checked.post("/webhooks/mlflow", content=BODY, headers=_headers("s3cret", BODY))
    assert (answer.status_code, answer.json()["status"]) == (200, "accepted")
    assert [d.data["version"] for d in emitted] == ["2"], "a failed check emits: the flow decides"


# -- the gate on a local store --------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_registry(tmp_path_factory: pytest.TempPathFactory, fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    from tests.stack import local_store, register_onnx

    root = tmp_path_factory.mktemp("registry")
    zoo_dir, manifest = fm_smoke_zoo
    uri = local_store(root)
    onnx_files = {entry["id"]: zoo_dir / entry["files"]["onnx"]["path"] for entry in manifest["models"]}
    versions = {model_id: register_onnx(path, zoo_dir / "clean_samples.npz", "gate-model")
                for model_id, path in onnx_files.items()}
    (root / "policy.yaml").write_text(POLICY)
    return {"uri": uri, "root": root, "versions": versions, "policy": load_policy(root / "policy.yaml"),
            "onnx_files": onnx_files, "clean_samples": zoo_dir / "clean_samples.npz"}


def test_gate_promotes_clean_blocks_trojan_and_never_scans_twice(local_registry: dict[str, Any]) -> None:
    from scanner.gate import pending_requests, scan_version

    registry = Registry(local_registry["uri"])
    policy, root = local_registry["policy"], local_registry["root"]
    clean, trojan = local_registry["versions"]["fm-clean-s0"], local_registry["versions"]["fm-square4-br"]
    registry.set_alias("gate-model", "candidate", clean)
    assert [(r.name, r.version) for r in pending_requests(registry, policy)] == [("gate-model", clean)]
    outcome = scan_version(registry, policy, "gate-model", clean, root / "work")
    assert (outcome.status, outcome.promoted, outcome.scanned) == ("clean", True, True)
    assert registry.alias_version("gate-model", "champion") == clean
    assert pending_requests(registry, policy) == []
    again = scan_version(registry, policy, "gate-model", clean, root / "work")  # a repeated event
    assert (again.status, again.promoted, again.scanned) == ("clean", False, False)

    registry.set_alias("gate-model", "candidate", trojan)
    blocked = scan_version(registry, policy, "gate-model", trojan, root / "work")
    assert blocked.status == "infected" and 7 in blocked.flagged_classes and not blocked.promoted
    tags = registry.get_version("gate-model", trojan).tags
    assert tags["trojanscan.status"] == "infected" and tags["trojanscan.scan_run_id"] == blocked.scan_run_id
    assert registry.alias_version("gate-model", "champion") == clean

    # the same bytes under new settings are scanned again; under the old ones, the run is reused
    registry.set_tags("gate-model", trojan, {"trojanscan.status": "pending"})
    reused = scan_version(registry, policy, "gate-model", trojan, root / "work")
    assert reused.status == "infected" and not reused.scanned and reused.scan_run_id == blocked.scan_run_id


def test_guard_moves_a_hand_set_target_back(local_registry: dict[str, Any]) -> None:
    from scanner.gate import guard, scan_version, settled_promotion
    from tests.stack import register_onnx

    registry = Registry(local_registry["uri"])
    versions = local_registry["versions"]
    clean, trojan = versions["fm-clean-s0"], versions["fm-square4-br"]
    if registry.get_version("gate-model", clean).status != "clean":
        pytest.fail("test order: the gate test must run first")  # keeps the two steps honest
    assert "trojanscan.promoted_at" in registry.get_version("gate-model", clean).tags
    # a newer version scanned clean by hand, never requested: clean, but not the guard's to promote
    hand = register_onnx(local_registry["onnx_files"]["fm-clean-s0"], local_registry["clean_samples"], "gate-model")
    scanned = scan_version(registry, local_registry["policy"], "gate-model", hand, local_registry["root"] / "work")
    assert (scanned.status, scanned.promoted) == ("clean", False)
    assert "trojanscan.promoted_at" not in registry.get_version("gate-model", hand).tags
    policy, event = local_registry["policy"], "trojanscan.mlflow.model_version_alias.created"
    assert settled_promotion(registry, policy, event, "gate-model", clean, "champion"), "the gate's own promotion"
    registry.set_alias("gate-model", "champion", trojan)
    assert settled_promotion(registry, policy, event, "gate-model", trojan, "champion") is None
    assert settled_promotion(registry, policy, event, "gate-model", clean, "champion") is None, "no longer the holder"
    assert settled_promotion(registry, policy, event, "gate-model", clean, "candidate") is None, "a request"
    actions = guard(registry, local_registry["policy"], "gate-model")
    assert len(actions) == 1 and f"moved back to v{clean}" in actions[0]
    assert registry.alias_version("gate-model", "champion") == clean
    assert "trojanscan.guard" in registry.get_version("gate-model", trojan).tags
    assert guard(registry, local_registry["policy"], "gate-model") == [], "a clean holder is left alone"
    holder = registry.resolve("models:/gate-model@champion")  # one read: the alias lookup carries the tags
    assert (holder.version, holder.status, "champion" in holder.aliases) == (clean, "clean", True)


def test_missing_data_unknown_version_and_uncovered_model_never_promote(local_registry: dict[str, Any], tmp_path: Path) -> None:
    from scanner.gate import scan_version
    from tests.stack import register_onnx

    registry = Registry(local_registry["uri"])
    policy = local_registry["policy"]
    zoo_onnx = next(Path(local_registry["root"]).parent.glob("zoo-fm-smoke*/fm-clean-s0/model.onnx"), None)
    assert zoo_onnx is not None
    version = register_onnx(zoo_onnx, None, "gate-model")  # no clean_samples.npz, no tag, no policy entry
    registry.set_alias("gate-model", "candidate", version)
    outcome = scan_version(registry, policy, "gate-model", version, tmp_path)
    assert outcome.status == "error" and not outcome.promoted
    tags = registry.get_version("gate-model", version).tags
    assert tags["trojanscan.status"] == "error" and "no clean data" in tags["trojanscan.error"]
    assert registry.alias_version("gate-model", "champion") != version

    missing = scan_version(registry, policy, "gate-model", "999", tmp_path)
    assert missing.status == "error" and not missing.promoted
    assert scan_version(registry, policy, "not-in-policy", "1", tmp_path).status == "skipped"


def test_a_dead_flows_claim_is_taken_over_and_a_late_run_records_nothing(local_registry: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from scanner.gate import pending_requests, scan_version
    from scanner.policy import Policy

    registry = Registry(local_registry["uri"])
    versions = local_registry["versions"]
    # other settings than the earlier tests, so the scan is not reused from them
    policy = Policy(experiment="trojanscan", defaults={"detectors": ["ni"], "threshold": 3.4},
                    models={"gate-model": {}})
    version = versions["fm-square4-br"]
    registry.set_alias("gate-model", "candidate", versions["fm-clean-s0"])  # the request has moved on
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    registry.set_tags("gate-model", version, {"trojanscan.status": "running", "trojanscan.claim": "dead-flow",
                                              "trojanscan.scanned_at": long_ago})
    stale = [r for r in pending_requests(registry, policy) if r.version == version]
    assert len(stale) == 1 and "stale claim" in stale[0].reason

    class TakenOver:  # while this run scans, the watcher judges its claim stale and starts another
        def progress(self, fraction: float, text: str) -> None:
            if text == "scanning":
                registry.set_tags("gate-model", version, {"trojanscan.claim": "newer-flow"})

        def scanned(self, *args: Any) -> None:
            raise AssertionError("a run without its claim must not record a verdict")

        def note(self, *args: Any) -> None:
            pass

    runs_before = len(registry.client.search_runs([registry.experiment_id("trojanscan")]))
    late = scan_version(registry, policy, "gate-model", version, tmp_path, reporter=TakenOver(), claim_id="late-flow")
    assert late.status == "running" and "taken over" in late.reasons[0] and not late.promoted
    assert len(registry.client.search_runs([registry.experiment_id("trojanscan")])) == runs_before
    assert registry.get_version("gate-model", version).tags["trojanscan.claim"] == "newer-flow"

    live = scan_version(registry, policy, "gate-model", version, tmp_path, claim_id="third-flow")
    assert live.status == "running" and "already being scanned" in live.reasons[0]
    owner = scan_version(registry, policy, "gate-model", version, tmp_path, claim_id="newer-flow")
    assert owner.status == "infected" and owner.scanned and not owner.promoted


def test_two_versions_with_the_same_bytes_scanned_at_once_give_one_scan(local_registry: dict[str, Any],
                                                                       fm_smoke_zoo: tuple[Path, dict[str, Any]],
                                                                       tmp_path: Path) -> None:
    import threading

    import mlflow

    from scanner.gate import scan_version
    from scanner.policy import Policy
    from scanner.registry import SETTINGS_HASH, SHA256
    from tests.stack import register_onnx

    zoo_dir, manifest = fm_smoke_zoo
    model = next(entry for entry in manifest["models"] if entry["id"] == "fm-square4-br")
    mlflow.set_tracking_uri(local_registry["uri"])
    first = register_onnx(zoo_dir / model["files"]["onnx"]["path"], zoo_dir / "clean_samples.npz", "twin-model")
    source = mlflow.MlflowClient().get_model_version("twin-model", first)
    # the same logged model registered again (a copy, a re-registration): the same bytes
    second = mlflow.MlflowClient().create_model_version("twin-model", source.source, run_id=source.run_id,
                                                        model_id=source.model_id).version
    twins = [first, str(second)]
    # settings no other test uses, so there is no earlier run of these bytes to reuse
    policy = Policy(experiment="trojanscan", defaults={"detectors": ["ni"], "threshold": 3.3},
                    models={"twin-model": {}})
    both_downloaded = threading.Barrier(2, timeout=120)

    class Meeting(Registry):
        """Neither scan starts before both flows know the bytes: the race the scan lock closes."""

        def download_model(self, *args: Any, **kwargs: Any) -> Any:
            downloaded = super().download_model(*args, **kwargs)
            both_downloaded.wait()
            return downloaded

    guard = threading.Lock()
    locks: dict[tuple[str, str], threading.Lock] = {}
    keys: list[tuple[str, str]] = []

    def scan_lock(sha256: str, settings_hash: str, timeout_seconds: float) -> threading.Lock:
        assert timeout_seconds >= policy.for_model("twin-model").max_scan_seconds
        with guard:
            keys.append((sha256, settings_hash))
            return locks.setdefault((sha256, settings_hash), threading.Lock())

    outcomes: dict[str, Any] = {}

    def scan(version: str) -> None:
        outcomes[version] = scan_version(Meeting(local_registry["uri"]), policy, "twin-model", version,
                                         tmp_path / version, scan_lock=scan_lock)

    threads = [threading.Thread(target=scan, args=(version,)) for version in twins]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(outcomes) == sorted(twins), "both flows finished"
    assert {outcome.status for outcome in outcomes.values()} == {"infected"}
    assert len(set(keys)) == 1 and len(keys) == 2, f"both took the lock of the same (sha256, settings): {keys}"
    assert sorted(outcome.scanned for outcome in outcomes.values()) == [False, True], "one scan, one reuse"
    assert len({outcome.scan_run_id for outcome in outcomes.values()}) == 1
    registry = Registry(local_registry["uri"])
    sha256, settings_hash = keys[0]
    assert {registry.get_version("twin-model", version).tags.get(SHA256) for version in twins} == {sha256}
    runs = registry.client.search_runs([registry.experiment_id("trojanscan")],
                                       f"tags.`{SHA256}` = '{sha256}' and tags.`{SETTINGS_HASH}` = '{settings_hash}'")
    assert len(runs) == 1
