"""Flow `scan-model-version`: started by a registry event (through the receiver and a deployment
trigger), by the watcher, or by hand. Scans one version and gates its promotion."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.config import FlowConfig
from flows.locking import claim_lock, scan_lock
from flows.reporting import PrefectReporter
from scanner.gate import event_action, guard, scan_version
from scanner.registry import RegistryUnavailable


@flow(name="scan-model-version", flow_run_name="scan {name} v{version}")
def scan_model_version(name: str, version: str, event: str = "manual", alias: str | None = None) -> Any:
    """Scan `name` version `version` and promote it if clean and still requested.

    `event` and `alias` come from the triggering registry event; an event for the target alias
    (someone set it by hand) runs the guard instead."""
    logger = get_run_logger()
    config = FlowConfig()
    registry, policy = config.registry(), config.load_policy()
    action = event_action(event, alias, policy, name)
    if action in ("skip", "ignore"):
        logger.info("%s v%s: %s %s", name, version, event, "(model not in the policy)" if action == "skip" else "needs nothing")
        return {"name": name, "version": version, "status": "skipped" if action == "skip" else "ignored"}
    if action == "guard":
        actions = guard(registry, policy, name)
        for action_taken in actions:
            logger.warning("guard: %s", action_taken)
        return {"name": name, "version": version, "status": "guard", "actions": actions}
    reporter = PrefectReporter("scan", name, f"v{version}")
    claim_id = str(flow_run.id or "") or None
    try:  # scan_version retries an unreachable registry itself
        outcome = scan_version(registry, policy, name, version, config.workdir, lock=claim_lock,
                               scan_lock=scan_lock, reporter=reporter, requested_by=event, claim_id=claim_id)
    except RegistryUnavailable as error:  # not even `error` could be written: the claim goes stale
        return Failed(message=f"registry unreachable, the watcher retries once the claim is stale: {error}")
    logger.info("%s v%s: %s%s", name, version, outcome.status, " (promoted)" if outcome.promoted else "")
    for reason in outcome.reasons:
        logger.info("  %s", reason)
    result = outcome.to_json()
    if outcome.unlearn:
        from flows.unlearn import start_unlearning

        result["unlearning"] = start_unlearning(name, version)
    if outcome.status == "error":
        # the flow run ends Failed (visible in Prefect); the version's tags hold the details
        return Failed(message=f"error: {outcome.reasons[-1] if outcome.reasons else 'scan failed'}")
    return result
