"""Flow `scan-model-version`: started by a registry event (through the receiver and a deployment
trigger), by the watcher, or by hand. Scans one version and gates its promotion."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.config import FlowConfig
from flows.locking import claim_lock
from flows.reporting import PrefectReporter
from scanner.gate import guard, scan_version
from scanner.policy import Policy
from scanner.registry import RegistryUnavailable


def _is_request(event: str, alias: str | None, policy: Policy, name: str) -> bool | None:
    """Does this event request a scan? None: the model is not covered by the policy."""
    if not policy.covers(name):
        return None
    request = policy.for_model(name).request
    if event.endswith("model_version_alias.created"):
        return alias == request.alias
    if event.endswith("model_version.created"):
        return request.on_register
    return True  # manual, watcher, patched: the caller asks for a scan


@flow(name="scan-model-version", flow_run_name="scan {name} v{version}")
def scan_model_version(name: str, version: str, event: str = "manual", alias: str | None = None) -> Any:
    """Scan `name` version `version` and promote it if clean and still requested.

    `event` and `alias` come from the triggering registry event; an alias event for any alias
    other than the request alias (e.g. someone setting the target alias) runs the guard."""
    logger = get_run_logger()
    config = FlowConfig()
    registry, policy = config.registry(), config.load_policy()
    requested = _is_request(event, alias, policy, name)
    if requested is None:
        logger.info("%s is not covered by the policy: ignored", name)
        return {"name": name, "version": version, "status": "skipped"}
    if not requested:
        actions = guard(registry, policy, name)
        for action in actions:
            logger.warning("guard: %s", action)
        return {"name": name, "version": version, "status": "guard", "actions": actions}
    reporter = PrefectReporter("scan", name, f"v{version}")
    claim_id = str(flow_run.id or "") or None
    try:  # scan_version retries an unreachable registry itself
        outcome = scan_version(registry, policy, name, version, config.workdir, lock=claim_lock,
                               reporter=reporter, requested_by=event, claim_id=claim_id)
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
