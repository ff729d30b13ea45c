"""The claim lock: one Prefect global concurrency slot shared by every scan flow, held only
while a flow reads a version's status and writes its claim (milliseconds), so two flows for the
same version cannot both start scanning it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

CLAIM_LIMIT = "trojanscan-claim"


def ensure_claim_limit() -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(CLAIM_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=CLAIM_LIMIT, limit=1))


@contextlib.contextmanager
def claim_lock() -> Iterator[None]:
    ensure_claim_limit()
    # the shortest lease the server takes: a holder killed inside frees the slot within a minute
    with concurrency(CLAIM_LIMIT, occupy=1, timeout_seconds=120, lease_duration=60, strict=True):
        yield
