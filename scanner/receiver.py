"""`trojanscan serve`: the ASGI app that receives MLflow webhooks.

POST /webhooks/mlflow: verify (signature, age, replay), then hand the delivery to `emit`
(a Prefect event in production) and answer at once; the scan itself runs in a flow. Events the
product does not act on (tags, registered models) are acknowledged and dropped. GET /health
answers `OK`. Given a policy, `trojanscan serve` also acknowledges without an event the
deliveries that need no flow run (`scanner.gate.settled_promotion`: the gate's own promotions).
A delivery whose emission fails is answered 503 and its id forgotten, so MLflow's
retry (or the watcher's poll) still gets the request through: nothing is lost.

Nothing slow runs on the event loop, so /health answers while deliveries are in flight: the
body is read with a size cap (a declared Content-Length over the cap is refused before
reading), the replay store's SQLite write runs in a worker thread, and `emit` is awaited when
it is a coroutine function (the Prefect emitter) or run in a worker thread when it is plain.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from scanner.webhooks import SUPPORTED, Delivery, ReplayGuard, WebhookRejected, verify

log = logging.getLogger("trojanscan.receiver")
MAX_BODY_BYTES = 1_000_000


class BodyTooLarge(Exception):
    """The request body is over the receiver's limit."""


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (BodyTooLarge) as soon as it is known to exceed `limit`: a
    client cannot make the receiver hold more than `limit` bytes of one request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no declared length
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def create_app(secret: str, emit: Callable[[Delivery], Any], replay: ReplayGuard | None = None,
               max_age: float = 300, settled: Callable[[Delivery], str | None] | None = None) -> Starlette:
    """The receiver app; `emit` turns an accepted delivery into a scan request and raises when
    it could not (a coroutine function is awaited, a plain one runs in a worker thread).

    `settled` (optional, run in a worker thread) returns why a verified delivery needs no flow
    run, or None; such a delivery is acknowledged without an event. When it fails (the registry
    is unreachable) the delivery is emitted as usual: the flow decides then."""
    if not secret:
        raise ValueError("the receiver needs the webhook secret")
    replay = replay or ReplayGuard(max_age=max_age)
    counts = {"accepted": 0, "rejected": 0, "ignored": 0, "settled": 0, "failed": 0}
    emit_is_async = inspect.iscoroutinefunction(emit) or inspect.iscoroutinefunction(getattr(emit, "__call__", None))

    async def emit_once(delivery: Delivery) -> None:
        if emit_is_async:
            await emit(delivery)
        else:
            await run_in_threadpool(emit, delivery)

    async def mlflow_webhook(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
        except BodyTooLarge:
            counts["rejected"] += 1
            return JSONResponse({"error": f"body too large (at most {MAX_BODY_BYTES} bytes)"}, status_code=413)
        try:
            delivery = verify(secret, dict(request.headers), body, max_age=max_age)
        except WebhookRejected as error:
            counts["rejected"] += 1
            log.warning("rejected delivery %s: %s", request.headers.get("x-mlflow-delivery-id"), error)
            return JSONResponse({"error": str(error)}, status_code=error.status)
        if not await run_in_threadpool(replay.first_time, delivery.delivery_id):
            counts["rejected"] += 1
            log.warning("rejected delivery %s: replayed", delivery.delivery_id)
            return JSONResponse({"error": "replayed delivery id"}, status_code=409)
        if (delivery.entity, delivery.action) not in SUPPORTED:
            counts["ignored"] += 1
            return JSONResponse({"status": "ignored", "event": delivery.event_name})
        if settled is not None:
            try:
                reason = await run_in_threadpool(settled, delivery)
            except Exception as error:  # noqa: BLE001 - the flow decides instead
                log.warning("settled check of %s failed, emitting it: %s", delivery.delivery_id, error)
                reason = None
            if reason:
                counts["settled"] += 1
                return JSONResponse({"status": "settled", "event": delivery.event_name, "reason": reason})
        try:
            await emit_once(delivery)
        except Exception as error:  # Prefect unreachable: let MLflow retry, the watcher also polls
            await run_in_threadpool(replay.forget, delivery.delivery_id)
            counts["failed"] += 1
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
