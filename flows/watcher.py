"""Flow `registry-watcher` (scheduled): applies the guard to every covered model, then starts
`scan-model-version` for each version that waits for a scan (stage transitions send no webhook;
events can be missed while the receiver is down)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.config import FlowConfig
from flows.reporting import artifact_key
from flows.scan_version import scan_model_version
from scanner.gate import guard, pending_requests

SCAN_DEPLOYMENT = "scan-model-version/scan-model-version"


@flow(name="registry-watcher")
def registry_watcher(dispatch: Literal["inline", "deployment"] = "inline") -> dict[str, Any]:
    """One poll. `inline` runs each scan as a subflow here (the embedded default, the demo);
    `deployment` hands each to the `scan-model-version` deployment (the `gpu` pool), with an
    idempotency key so two watchers (or two polls) create one flow run per request."""
    logger = get_run_logger()
    config = FlowConfig()
    registry, policy = config.registry(), config.load_policy()
    guard_actions = []
    for name in registry.registered_models():
        if policy.covers(name):
            guard_actions += guard(registry, policy, name)
    if guard_actions:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact("## Guard\n\n" + "\n".join(f"- {a}" for a in guard_actions),
                                 key=artifact_key("trojanscan-guard"), description="target moved back")
        for action in guard_actions:
            logger.warning("guard: %s", action)
    requests = pending_requests(registry, policy)
    outcomes = []
    for request in requests:
        logger.info("pending: %s v%s (%s)", request.name, request.version, request.reason)
        if dispatch == "deployment":
            info = registry.get_version(request.name, request.version)
            key = f"{request.name}/{request.version}/{info.tags.get('trojanscan.scanned_at', 'new')}"
            run = run_deployment(SCAN_DEPLOYMENT, parameters={"name": request.name, "version": request.version,
                                                              "event": "watcher"},
                                 timeout=0, idempotency_key=key, as_subflow=False)
            outcomes.append({"name": request.name, "version": request.version, "flow_run": str(run.id)})
        else:
            state = scan_model_version(request.name, request.version, event="watcher", return_state=True)
            result = state.result(raise_on_failure=False)
            outcomes.append(result if isinstance(result, dict) else {"name": request.name, "version": request.version,
                                                                      "status": "error", "reason": str(state.message)})
    return {"guard": guard_actions, "requests": [r.__dict__ for r in requests], "outcomes": outcomes}



