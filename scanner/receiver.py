"""`trojanscan serve`: the ASGI app that receives MLflow webhooks.

POST /webhooks/mlflow: verify (signature, age, replay), then hand the delivery to `emit`
(a Prefect event in production) and answer at once; the scan itself runs in a flow. Events the
product does not act on (tags, registered models) are acknowledged and dropped. GET /health
answers `OK`. A delivery whose emission fails is answered 503 and its id forgotten, so MLflow's
retry (or the watcher's poll) still gets the request through: nothing is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from scanner.webhooks import SUPPORTED, Delivery, ReplayGuard, WebhookRejected, verify

log = logging.getLogger("trojanscan.receiver")
MAX_BODY_BYTES = 1_000_000


def create_app(secret: str, emit: Callable[[Delivery], Any], replay: ReplayGuard | None = None,
               max_age: float = 300) -> Starlette:
    if not secret:
        raise ValueError("the receiver needs the webhook secret")
    replay = replay or ReplayGuard(max_age=max_age)
    counts = {"accepted": 0, "rejected": 0, "ignored": 0}

    async def mlflow_webhook(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            counts["rejected"] += 1
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            delivery = verify(secret, dict(request.headers), body, max_age=max_age)
        except WebhookRejected as error:
            counts["rejected"] += 1
            log.warning("rejected delivery %s: %s", request.headers.get("x-mlflow-delivery-id"), error)
            return JSONResponse({"error": str(error)}, status_code=error.status)
        if not replay.first_time(delivery.delivery_id):
            counts["rejected"] += 1
            log.warning("rejected delivery %s: replayed", delivery.delivery_id)
            return JSONResponse({"error": "replayed delivery id"}, status_code=409)
        if (delivery.entity, delivery.action) not in SUPPORTED:
            counts["ignored"] += 1
            return JSONResponse({"status": "ignored", "event": delivery.event_name})
        try:
            emit(delivery)
        except Exception as error:  # Prefect unreachable: let MLflow retry, the watcher also polls
            replay.forget(delivery.delivery_id)
            log.error("could not emit %s: %s", delivery.event_name, error)
            return JSONResponse({"error": "could not queue the request"}, status_code=503)
        counts["accepted"] += 1
        return JSONResponse({"status": "accepted", "event": delivery.event_name})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("OK")

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(counts)

    return Starlette(routes=[Route("/webhooks/mlflow", mlflow_webhook, methods=["POST"]),
                             Route("/health", health), Route("/stats", stats)])
