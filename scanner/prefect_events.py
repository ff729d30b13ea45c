"""The Prefect adapter of the receiver: turns a verified MLflow delivery into a Prefect event
`trojanscan.mlflow.<entity>.<action>` that the `scan-model-version` deployment trigger matches.
Plain strings only in the payload (name, version, alias, delivery_id): deployment-trigger
templates render those the same way on every Prefect release.

The event is posted to the Prefect API (`POST /api/events`) and the call returns only when the
server has taken it; any failure raises, so the receiver answers 503 and MLflow's retry (or the
watcher's poll) gets the request through. Prefect's `emit_event` is not used for this: it
queues the event for a background websocket client and returns at once, so with the server
down the receiver would answer 200 for an event that is then dropped, and a receiver killed
with events still queued loses them. The event id is derived from the delivery id, so a
delivery emitted twice (the server took it but its answer was lost, and MLflow retried) is
stored once: the events store ignores a repeated id.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from prefect.events import Event  # imported with the module: not on a request's path
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

from scanner.webhooks import Delivery

EMIT_TIMEOUT_SECONDS = 10.0
_EVENT_ID_NAMESPACE = uuid.UUID("5c3f3b1e-2f0b-4c55-9d8e-7a1f6f0c2b41")  # fixed: same delivery, same event id


class EmitFailed(Exception):
    """The Prefect API did not take the event."""


def event_id(delivery_id: str) -> uuid.UUID:
    """The Prefect event id of a delivery (stable across retries of the same delivery)."""
    return uuid.uuid5(_EVENT_ID_NAMESPACE, delivery_id)


def build_event(delivery: Delivery) -> dict[str, Any]:
    """The event as the Prefect API takes it (JSON of `prefect.events.Event`)."""
    data = delivery.data
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    payload = {"name": name, "version": version, "alias": str(data.get("alias") or ""),
               "delivery_id": delivery.delivery_id}
    event = Event(event=delivery.event_name, id=event_id(delivery.delivery_id),
                  resource={"prefect.resource.id": f"mlflow.model-version.{name}.{version}",
                            "prefect.resource.name": f"{name} v{version}"},
                  payload=payload)
    return event.model_dump(mode="json")


class PrefectEmitter:
    """Posts events to the Prefect API over one pooled HTTP client (an async callable for
    `create_app`, so waiting for the server never blocks the receiver's event loop)."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None,
                 timeout: float = EMIT_TIMEOUT_SECONDS) -> None:
        self.api_url = (api_url or PREFECT_API_URL.value() or "").rstrip("/")
        if not self.api_url:
            raise EmitFailed("PREFECT_API_URL is not set: the receiver needs a running Prefect server")
        key = api_key if api_key is not None else PREFECT_API_KEY.value()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client belongs to the loop that made it
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
            self._loop = loop
        return self._client

    async def __call__(self, delivery: Delivery) -> str:
        """Emit the delivery's event; returns the event id, raises EmitFailed."""
        event = build_event(delivery)
        try:
            response = await self._http().post(f"{self.api_url}/events", json=[event])
        except httpx.HTTPError as error:
            raise EmitFailed(f"Prefect API unreachable: {type(error).__name__}: {error}") from None
        if response.status_code >= 300:
            raise EmitFailed(f"Prefect API answered {response.status_code}: {response.text[:200]}")
        return str(event["id"])

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_default: PrefectEmitter | None = None


async def emit_delivery(delivery: Delivery) -> str:
    """Emit the event to the Prefect API found in the settings (`PREFECT_API_URL`); returns
    its id once the server has it, raises EmitFailed otherwise."""
    global _default
    if _default is None:
        _default = PrefectEmitter()
    return await _default(delivery)
