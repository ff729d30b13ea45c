"""Patch an infected registry version with its restored triggers and register the result.

The registry side of TABOR's patching (`scanner.unlearning` is the numeric core): take the
version's scan run (result JSON + restored masks/patterns), fine-tune the model on clean data
with those triggers stamped (true labels kept), log an MLflow run with CA and ASR before and
after, and register the patched model as a new version of the same registered model
with its lineage (`trojanscan.patched_from`, `trojanscan.unlearn_run_id`) and its CA drop
(`trojanscan.ca_drop`, and its upper confidence bound `trojanscan.ca_drop_bound`). The new
version is then scanned like any other; the gate promotes it only if it scans clean, the policy
auto-promotes patched versions, and its CA drop (the estimate or the bound, as the policy's
`ca_drop_check` says) is within the policy's limit.

The clean data of the fine-tune is the policy's `unlearn_data` when it names one, else the
version's own clean data (the scan's). A patch needs far more images than a scan to keep CA
(benchmarks/results/unlearning_data_size.md), so a registry whose versions carry a few hundred
clean samples can point `unlearn_data` at a larger set; the patched version is still scanned on
the source version's scan data, which its run logs as `clean_samples.npz`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scanner.errors import TrojanScanError
from scanner.policy import Policy
from scanner.registry import (CA_DROP, CA_DROP_BOUND, PATCHED_FROM, SCAN_RUN_ID, STATUS, UNLEARN_RUN_ID, Registry,
                              VersionInfo, utc_now)

if TYPE_CHECKING:  # scanner.unlearning imports torch: loaded when a patch runs, not with the flows
    from scanner.unlearning import Progress

UNLEARN_STATUS = "trojanscan.unlearn"


@dataclass
class PatchOutcome:
    name: str
    source_version: str
    patched_version: str | None = None
    unlearn_run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def patch_version(registry: Registry, policy: Policy, name: str, version: str, workdir: str | Path,
                  progress: Progress | None = None) -> PatchOutcome:
    """Unlearn the restored triggers of an infected version and register the patched model;
    `progress(fraction, text)` follows the fine-tune. Raises TrojanScanError (recorded on the
    source version as `trojanscan.unlearn`) on failure."""
    from scanner.unlearning import unlearn_files

    outcome = PatchOutcome(name=name, source_version=str(version))
    info = registry.get_version(name, version)
    if info.status != "infected" or SCAN_RUN_ID not in info.tags:
        raise TrojanScanError(f"{name} v{version} is {info.status or 'unscanned'}; only an infected, scanned "
                              "version is patched")
    model_policy = policy.for_model(name)
    folder = Path(workdir) / f"unlearn-{name}-v{version}-{uuid.uuid4().hex[:8]}"
    downloaded = registry.download_model(info, folder / "model", allow_pickle=model_policy.allow_pickle)
    scan_dir = folder / "scan"
    scanned = json.loads(registry.download_run_artifact(info.tags[SCAN_RUN_ID], "result.json", scan_dir).read_text())
    if _lists_restored_triggers(scanned):  # a NeuronInspect-only scan has none: the patch restores them
        registry.download_run_artifact(info.tags[SCAN_RUN_ID], "triggers", scan_dir)
    data_path, data_reference = registry.resolve_clean_data(info, model_policy.clean_data, folder / "data")
    unlearn_path, unlearn_reference = data_path, data_reference
    if model_policy.unlearn_data:  # a larger set for the fine-tune; the patched version is scanned on data_path
        unlearn_reference = model_policy.unlearn_data
        unlearn_path = registry.fetch_uri(unlearn_reference, folder / "unlearn-data")
    suffix = ".onnx" if downloaded.flavor == "onnx" else ".pt2"
    patched_file = folder / f"patched{suffix}"
    result = unlearn_files(downloaded.model_file, unlearn_path, scan_dir / "result.json", patched_file,
                           model_policy.unlearn, normalization=model_policy.normalization, progress=progress)
    ca_drop = result.ca_drop.drop
    outcome.metrics = {"ca_before": result.before.clean_accuracy, "ca_after": result.after.clean_accuracy,
                       "asr_restored_before": result.before.max_asr_restored,
                       "asr_restored_after": result.after.max_asr_restored, "ca_drop": ca_drop,
                       "ca_drop_bound": result.ca_drop.upper_bound}
    run_id, new_version = _log_and_register(registry, policy.experiment, info, patched_file, data_path, result.to_json(),
                                            outcome.metrics, data_reference, unlearn_reference)
    outcome.unlearn_run_id, outcome.patched_version = run_id, new_version
    registry.set_tags(name, new_version, {PATCHED_FROM: str(version), UNLEARN_RUN_ID: run_id,
                                          CA_DROP: f"{max(ca_drop, 0.0):.6f}",
                                          CA_DROP_BOUND: f"{max(result.ca_drop.upper_bound, 0.0):.6f}",
                                          STATUS: "pending"})  # status last
    registry.set_tags(name, version, {UNLEARN_STATUS: f"{utc_now()} patched as v{new_version} (run {run_id})"})
    return outcome


def _lists_restored_triggers(result: dict[str, Any]) -> bool:
    return any("mask_npy" in files for detector in result.get("detectors", {}).values()
               for files in detector.get("artifacts", {}).values())


def _log_and_register(registry: Registry, experiment: str, info: VersionInfo, patched_file: Path, data_path: Path,
                      unlearn_json: dict[str, Any], metrics: dict[str, float], data_reference: str,
                      unlearn_reference: str) -> tuple[str, str]:
    """One MLflow run for the patch (metrics, the unlearning JSON, the clean data the source was
    scanned on, which the patched version is scanned on too) that also logs the patched model,
    registered as the next version of the same registered model."""
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    experiment_id = registry.experiment_id(experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"unlearn {info.name} v{info.version}") as run:
        mlflow.set_tags({"trojanscan.model": f"{info.name}/{info.version}", "trojanscan.kind": "unlearn",
                         "trojanscan.clean_data_source": data_reference,
                         "trojanscan.unlearn_data_source": unlearn_reference})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(unlearn_json, "unlearning.json")
        clean_samples = data_path if data_path.name == "clean_samples.npz" else _as_clean_samples(data_path)
        mlflow.log_artifact(str(clean_samples))  # the patched version's scan finds its data in its source run
        if patched_file.suffix == ".onnx":
            import onnx

            logged = mlflow.onnx.log_model(onnx.load(str(patched_file)), name="model",
                                           registered_model_name=info.name, pip_requirements=["onnxruntime"],
                                           onnx_execution_providers=["CPUExecutionProvider"])
        else:
            import numpy as np
            import torch

            from scanner.data import CleanData

            module = torch.export.load(str(patched_file)).module()
            example = CleanData.load_npz(data_path).x[:2].astype(np.float32)
            logged = mlflow.pytorch.log_model(module, name="model", registered_model_name=info.name,
                                              serialization_format="pt2", input_example=example,
                                              pip_requirements=["torch"])
    return run.info.run_id, str(logged.registered_model_version)


def _as_clean_samples(data_path: Path) -> Path:
    """The clean data under the name the registry looks for in a version's source run."""
    target = data_path.parent / "clean_samples" / "clean_samples.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data_path.read_bytes())
    return target
