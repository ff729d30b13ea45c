"""Flow `unlearn-retrain`: patch an infected version with its restored triggers, register the
patched model as a new version with its lineage, and scan that version with the same flow as
any other (the gate decides whether it is promoted)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.config import FlowConfig
from flows.reporting import PrefectReporter
from flows.scan_version import scan_model_version
from scanner.errors import TrojanScanError
from scanner.registry import utc_now
from scanner.retrain import UNLEARN_STATUS, patch_version


@flow(name="unlearn-retrain", flow_run_name="unlearn {name} v{version}")
def unlearn_retrain(name: str, version: str) -> Any:
    logger = get_run_logger()
    config = FlowConfig()
    registry, policy = config.registry(), config.load_policy()
    try:
        reporter = PrefectReporter("unlearn", name, f"v{version}")  # a progress artifact while fine-tuning
        patched = patch_version(registry, policy, name, version, config.workdir, progress=reporter.progress)
    except TrojanScanError as error:
        registry.set_tags(name, version, {UNLEARN_STATUS: f"{utc_now()} failed: {error}"})
        return Failed(message=f"unlearning failed: {error}")
    logger.info("%s v%s patched as v%s: CA %.4f -> %.4f (upper bound of the drop %+.4f), restored-trigger ASR "
                "%.3f -> %.3f", name, version, patched.patched_version, patched.metrics["ca_before"],
                patched.metrics["ca_after"], patched.metrics["ca_drop_bound"], patched.metrics["asr_restored_before"],
                patched.metrics["asr_restored_after"])
    rescan = scan_model_version(name, patched.patched_version, event="patched", return_state=True)
    result = rescan.result(raise_on_failure=False)
    return {"name": name, "source_version": version, "patched_version": patched.patched_version,
            "unlearn_run_id": patched.unlearn_run_id, "metrics": patched.metrics,
            "rescan": result if isinstance(result, dict) else {"status": "error", "reason": str(rescan.message)}}


def start_unlearning(name: str, version: str) -> dict[str, Any] | None:
    """Called by the gate flow for an infected version when the policy says auto-unlearn: runs
    the deployment when this flow is deployed (the `gpu` pool), else as a subflow here."""
    from prefect.runtime import deployment

    if deployment.id:
        from prefect.deployments import run_deployment

        run = run_deployment("unlearn-retrain/unlearn-retrain", parameters={"name": name, "version": version},
                             timeout=0, idempotency_key=f"unlearn/{name}/{version}", as_subflow=False)
        return {"flow_run": str(run.id)}
    state = unlearn_retrain(name, version, return_state=True)
    result = state.result(raise_on_failure=False)
    return result if isinstance(result, dict) else {"status": "error", "reason": str(state.message)}
