"""`trojanscan demo`: the whole product on the embedded defaults, no server needed.

A SQLite-backed MLflow registry in the demo folder, Prefect without a server (each process runs
a temporary one). MLflow sends webhooks only from a running server, so here the watcher's poll
carries the requests, exactly as it does for stage transitions in production.

Story: a clean and a trojaned Fashion-MNIST classifier are registered as versions 1 and 2 of
`fashion-classifier`; each is requested for production with the alias `candidate`; the real
flows scan them; the clean one gets `champion`, the trojaned one is blocked and handed to the
unlearning flow, which registers a patched version 3 and scans it (promoted only if clean);
then someone moves `champion` onto the trojaned version by hand and the watcher's guard moves
it back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_NAME = "fashion-classifier"


def configure(out: Path) -> dict[str, str]:
    """Environment for an embedded run; set before Prefect or MLflow are imported."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "TROJANSCAN_POLICY": str((out / "policy.yaml").resolve()),
        "TROJANSCAN_WORKDIR": str((out / "work").resolve()),
        "PREFECT_HOME": str((out / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    os.environ.update(env)
    return env


POLICY = """\
# trojanscan policy for the demo (see scanner/policy.py for every field)
experiment: trojanscan
defaults:
  request: {alias: candidate}
  target: {alias: champion}
  detectors: [ni, tabor]
  threshold: 2.0
  auto_unlearn: true           # an infected version is patched with its restored triggers...
  auto_promote_patched: true   # ...and the patched version is promoted if it scans clean
  max_ca_drop: 0.01
models:
  fashion-classifier:
    unlearn_data: UNLEARN_DATA  # the patch's own clean set: a scan needs hundreds of images, a patch thousands
"""
UNLEARN_IMAGES = 12500  # 80% fine-tuned, of which 10% (1000) pick each round's epoch; 20% measure the CA drop


def write_unlearn_data(out: Path) -> Path:
    """Clean Fashion-MNIST training images for the patch (the defender's clean training data, as
    in the TABOR paper), the first of each class: on 400 images the demo's patch loses about 4
    points of CA, on 10000 none (benchmarks/results/unlearning_data_size.md)."""
    from scanner.fashion_mnist import NUM_CLASSES, load_fashion_mnist
    from scanner.zoo import balanced_subset

    path = (out / "unlearn-data.npz").resolve()
    if not path.is_file():
        balanced_subset(load_fashion_mnist("train"), UNLEARN_IMAGES // NUM_CLASSES).save_npz(path)
    return path


def register_models(out: Path, say: Callable[[str], None]) -> dict[str, str]:
    """Train the demo zoo (a clean and a trojaned model, the same as two of the full zoo's) and
    register both as ONNX versions,
    each source run carrying the clean samples the scan will use."""
    import mlflow
    import onnx

    from scanner.zoo import build_zoo

    zoo_dir = out / "zoo"
    manifest = build_zoo("fashion-mnist", "demo", zoo_dir, progress=say)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    artifacts = (out / "mlartifacts").resolve()
    for experiment in ("demo-models", "trojanscan"):
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=(artifacts / experiment).as_uri())
    mlflow.set_experiment("demo-models")
    versions = {}
    for entry in manifest["models"]:
        with mlflow.start_run(run_name=entry["id"]):
            mlflow.log_params({"arch": entry["arch"], "seed": entry["seed"], "zoo_model": entry["id"]})
            mlflow.log_metric("clean_accuracy", entry["clean_accuracy"])
            mlflow.log_artifact(str(zoo_dir / "clean_samples.npz"))
            info = mlflow.onnx.log_model(onnx.load(str(zoo_dir / entry["files"]["onnx"]["path"])), name="model",
                                         registered_model_name=MODEL_NAME, pip_requirements=["onnxruntime"],
                                         onnx_execution_providers=["CPUExecutionProvider"])
        version = str(info.registered_model_version)
        versions[entry["id"]] = version
        say(f"registered {entry['id']} as {MODEL_NAME} v{version} (CA {entry['clean_accuracy']:.3f}"
            + (f", trojan: target {entry['targets']}, ASR {entry['attack_success_rate']:.3f})" if entry["trojaned"] else ")"))
    return versions


def _held_back(outcome: dict) -> str:
    """Why the gate did not promote a version, from its outcome's reasons ("not promoted: ...")."""
    reasons = [r for r in outcome.get("reasons", []) if r.startswith("not promoted")]
    return reasons[-1] if reasons else "not promoted"


def run_demo(out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the story; returns the final state of every version (for the CLI's table and tests)."""
    started = time.perf_counter()
    configure(out)
    unlearn_data = write_unlearn_data(out)
    say(f"policy: {out / 'policy.yaml'} (an infected version is patched on {UNLEARN_IMAGES} clean training images, "
        f"{unlearn_data.name})")
    (out / "policy.yaml").write_text(POLICY.replace("UNLEARN_DATA", str(unlearn_data)))
    versions = register_models(out, say)

    from flows.watcher import registry_watcher
    from scanner.registry import Registry

    registry = Registry(os.environ["MLFLOW_TRACKING_URI"])
    steps = []
    for model_id, version in versions.items():
        say(f"request: set @candidate on v{version} ({model_id}); the watcher's poll picks it up")
        registry.set_alias(MODEL_NAME, "candidate", version)
        report = registry_watcher()
        steps.append(report)
        for outcome in report["outcomes"]:
            say(f"  v{outcome.get('version')}: {outcome.get('status')}"
                + (" -> promoted to @champion" if outcome.get("promoted") else " -> not promoted"))
            patch = outcome.get("unlearning")
            if patch and patch.get("patched_version"):
                m, rescan = patch["metrics"], patch["rescan"]
                say(f"  unlearning: v{outcome.get('version')} patched as v{patch['patched_version']} "
                    f"(CA {m['ca_before']:.3f} -> {m['ca_after']:.3f}, upper bound of the drop "
                    f"{m['ca_drop_bound']:+.3f}; restored-trigger ASR "
                    f"{m['asr_restored_before']:.3f} -> {m['asr_restored_after']:.3f}); rescan: {rescan.get('status')}"
                    + (", promoted to @champion" if rescan.get("promoted") else f", {_held_back(rescan)}"))
            elif patch:
                say(f"  unlearning failed: {patch.get('reason')}")
    trojaned = [v for model_id, v in versions.items() if "clean" not in model_id]
    if trojaned:
        say(f"tamper: someone moves @champion onto v{trojaned[0]} by hand; the watcher's guard runs")
        registry.set_alias(MODEL_NAME, "champion", trojaned[0])
        report = registry_watcher()
        steps.append(report)
        for action in report["guard"]:
            say(f"  guard: {action}")
    final = {info.version: {"aliases": list(info.aliases), "tags": info.tags}
             for info in registry.versions(MODEL_NAME)}
    return {"versions": final, "steps": steps, "seconds": time.perf_counter() - started,
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "work": os.environ["TROJANSCAN_WORKDIR"]}
