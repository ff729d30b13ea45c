"""MLflow webhook deliveries: signature check, age check and replay protection.

MLflow (3.17) signs each delivery with HMAC-SHA256 over `"{delivery_id}.{timestamp}.{body}"`
using the webhook's secret, sent as `X-MLflow-Signature: v1,<base64 digest>` beside
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp` (unix seconds). A delivery is accepted only if
the signature matches, the timestamp is at most `max_age` seconds old (and not from the future),
and its delivery id was never accepted before. Ids are kept in SQLite so a restarted receiver
still refuses a replay inside the age window; older ids are pruned, the age check covers them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_AGE_SECONDS = 300
SUPPORTED = {("model_version", "created"), ("model_version_alias", "created")}


class WebhookRejected(Exception):
    """A delivery that must not be acted on; `status` is the HTTP answer."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Delivery:
    """A verified delivery."""

    delivery_id: str
    timestamp: int
    entity: str
    action: str
    data: dict[str, Any]

    @property
    def event_name(self) -> str:
        return f"trojanscan.mlflow.{self.entity}.{self.action}"


def sign(secret: str, delivery_id: str, timestamp: int | str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this delivery."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None,
           max_age: float = MAX_AGE_SECONDS) -> Delivery:
    """Check signature and age and parse the body; raises WebhookRejected (nothing else)."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery_id = lower.get("x-mlflow-delivery-id", "")
    timestamp = lower.get("x-mlflow-timestamp", "")
    signature = lower.get("x-mlflow-signature", "")
    if not (delivery_id and timestamp and signature):
        raise WebhookRejected("missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body), signature):
        raise WebhookRejected("bad signature")
    try:
        sent = int(timestamp)
    except ValueError:
        raise WebhookRejected("timestamp is not an integer") from None
    age = (time.time() if now is None else now) - sent
    if age > max_age or age < -60:  # a minute of clock skew into the future is tolerated
        raise WebhookRejected(f"stale timestamp ({age:.0f} s old; at most {max_age:.0f} s)")
    try:
        payload = json.loads(body)
        entity, action, data = payload["entity"], payload["action"], payload.get("data") or {}
    except (ValueError, KeyError, TypeError):
        raise WebhookRejected("body is not an MLflow webhook payload", status=400) from None
    if not isinstance(data, dict):
        raise WebhookRejected("payload data is not an object", status=400)
    return Delivery(delivery_id, sent, str(entity), str(action), data)


class ReplayGuard:
    """Delivery ids seen within the age window, in SQLite (":memory:" for a single process)."""

    PRUNE_EVERY_SECONDS = 10.0  # pruning scans the table: once in a while, not per delivery

    def __init__(self, path: str | Path = ":memory:", max_age: float = MAX_AGE_SECONDS) -> None:
        self.max_age = max_age
        self.lock = threading.Lock()
        # the timeout lets a second receiver process sharing the file wait for its write
        # instead of failing with "database is locked"
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        if str(path) != ":memory:":
            # WAL: a write is one append instead of a rollback journal per delivery; still durable
            # enough that an accepted id survives a receiver crash (only an OS crash can lose it)
            self.db.execute("pragma journal_mode=wal")
            self.db.execute("pragma synchronous=normal")
        self.db.execute("create table if not exists deliveries (id text primary key, seen real)")
        self.db.execute("create index if not exists deliveries_seen on deliveries (seen)")
        self._pruned = 0.0

    def first_time(self, delivery_id: str) -> bool:
        """Record the id; False when it was recorded before (a replay)."""
        now = time.time()
        with self.lock:
            if now - self._pruned > self.PRUNE_EVERY_SECONDS:
                self.db.execute("delete from deliveries where seen < ?", (now - 2 * self.max_age,))
                self._pruned = now
            try:
                self.db.execute("insert into deliveries values (?, ?)", (delivery_id, now))
            except sqlite3.IntegrityError:
                return False
        return True

    def forget(self, delivery_id: str) -> None:
        """Undo `first_time` when acting on the delivery failed, so MLflow's retry is accepted."""
        with self.lock:
            self.db.execute("delete from deliveries where id = ?", (delivery_id,))
