"""The claim lock: a Prefect global concurrency slot held only while a flow reads a version's
status and writes its claim (milliseconds), so two flows for the same version cannot both start
scanning it.

The slot is one of `CLAIM_BUCKETS` limits of one slot each, chosen by a hash of the version:
flows for the same version always meet on the same slot, while a burst of different versions
rarely queues. A single slot for every scan made them queue: Prefect answers a busy slot with a
Retry-After that grows with the denials, about a second per scan in a burst of 20 versions
(benchmarks/registry_latency.py)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

CLAIM_LIMIT = "trojanscan-claim"
CLAIM_BUCKETS = 64


def claim_limit_name(name: str, version: str) -> str:
    """The global concurrency limit that guards the claim of `name` version `version`."""
    digest = hashlib.sha256(f"{name}\0{version}".encode()).digest()
    return _bucket_limit(int.from_bytes(digest[:4], "big") % CLAIM_BUCKETS)


def _bucket_limit(bucket: int) -> str:
    return f"{CLAIM_LIMIT}-{bucket}"


def ensure_claim_limit(limit_name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=1))


def ensure_claim_limits() -> None:
    """Create every bucket's limit up front (the worker does at start), so a burst of first
    claims does not also create limits: more writes while Prefect's database is busiest."""
    for bucket in range(CLAIM_BUCKETS):
        ensure_claim_limit(_bucket_limit(bucket))


@contextlib.contextmanager
def claim_lock(name: str, version: str) -> Iterator[None]:
    limit_name = claim_limit_name(name, version)
    ensure_claim_limit(limit_name)
    # the shortest lease the server takes: a holder killed inside frees the slot within a minute
    with concurrency(limit_name, occupy=1, timeout_seconds=120, lease_duration=60, strict=True):
        yield
