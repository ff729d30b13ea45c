"""The Prefect adapter of the receiver: turns a verified MLflow delivery into a Prefect event
`trojanscan.mlflow.<entity>.<action>` that the `scan-model-version` deployment trigger matches.
Plain strings only in the payload (name, version, alias): deployment-trigger templates render
those the same way on every Prefect release."""

from __future__ import annotations

from scanner.webhooks import Delivery


def emit_delivery(delivery: Delivery) -> str | None:
    """Emit the event; returns its id (None when Prefect has no events client configured)."""
    from prefect.events import emit_event

    data = delivery.data
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    payload = {"name": name, "version": version, "alias": str(data.get("alias") or ""),
               "delivery_id": delivery.delivery_id}
    event = emit_event(event=delivery.event_name,
                       resource={"prefect.resource.id": f"mlflow.model-version.{name}.{version}",
                                 "prefect.resource.name": f"{name} v{version}"},
                       payload=payload)
    return str(event.id) if event is not None else None
