"""Two Prefect locks that keep concurrent flows from doing the same work twice.

- The **claim lock** is held only while a flow reads a version's status and writes its claim
  (milliseconds), so two flows for the same version cannot both start scanning it.
- The **scan lock** is held from the moment a flow knows the model's bytes (its sha256) until
  its scan run is logged, so two *different* versions with the same bytes and settings, scanned
  at once, give one scan: the second waits and reuses the first's run (product.md: one scan per
  (sha256, settings)).

Each lock is one of `BUCKETS` global concurrency limits of one slot, chosen by a hash of its
key: flows with the same key always meet on the same slot, while a burst of different keys
rarely queues. A single slot for every scan made them queue: Prefect answers a busy slot with a
Retry-After that grows with the denials, about a second per scan in a burst of 20 versions
(benchmarks/registry_latency.py). Two scans whose keys share a bucket run one after the other:
with 64 buckets, a burst of 20 new models has about three such pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

CLAIM_LIMIT = "trojanscan-claim"
SCAN_LIMIT = "trojanscan-scan"
BUCKETS = 64
# the shortest lease the server takes: a holder killed inside frees the slot within a minute;
# a live holder's lease is renewed by Prefect in the background
LEASE_SECONDS = 60


def bucket_limit_name(prefix: str, *key: str) -> str:
    """The global concurrency limit that guards `key` (its parts kept apart by a NUL byte)."""
    digest = hashlib.sha256("\0".join(key).encode()).digest()
    return f"{prefix}-{int.from_bytes(digest[:4], 'big') % BUCKETS}"


def claim_limit_name(name: str, version: str) -> str:
    return bucket_limit_name(CLAIM_LIMIT, name, version)


def scan_limit_name(sha256: str, settings_hash: str) -> str:
    return bucket_limit_name(SCAN_LIMIT, sha256, settings_hash)


def ensure_limit(limit_name: str, client: SyncPrefectClient | None = None) -> None:
    """Create the one-slot limit unless it exists (through `client` when given)."""
    with contextlib.ExitStack() as opened:
        client = client or opened.enter_context(get_client(sync_client=True))
        try:
            client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=1))


def ensure_lock_limits() -> None:
    """Create every bucket's limit of both locks up front (the worker does at start), so a burst
    of first claims does not also create limits: more writes while Prefect's database is busiest.
    One API client for all 128: a client per limit cost the worker's start about 8 s of CPU (each
    builds a TLS context), seen with py-spy on 2 cores."""
    with get_client(sync_client=True) as client:
        for prefix in (CLAIM_LIMIT, SCAN_LIMIT):
            for bucket in range(BUCKETS):
                ensure_limit(f"{prefix}-{bucket}", client)


@contextlib.contextmanager
def _one_slot(limit_name: str, timeout_seconds: float, stop_on_lost_lease: bool = True) -> Iterator[None]:
    """Hold the limit's slot. A limit nobody created yet (a worker started from prefect.yaml
    rather than `trojanscan worker`) is created on the first refusal, then taken. With
    `stop_on_lost_lease`, Prefect stops the holder when it cannot renew the lease."""
    with contextlib.ExitStack() as held:
        for attempt in (1, 2):
            try:
                held.enter_context(concurrency(limit_name, occupy=1, timeout_seconds=timeout_seconds,
                                               lease_duration=LEASE_SECONDS, strict=True,
                                               raise_on_lease_renewal_failure=stop_on_lost_lease))
                break
            except ConcurrencySlotAcquisitionError:  # not a timeout: that is a TimeoutError
                if attempt == 2:
                    raise
                ensure_limit(limit_name)
        yield


@contextlib.contextmanager
def claim_lock(name: str, version: str) -> Iterator[None]:
    with _one_slot(claim_limit_name(name, version), timeout_seconds=120):
        yield


@contextlib.contextmanager
def scan_lock(sha256: str, settings_hash: str, timeout_seconds: float) -> Iterator[None]:
    """Held through a whole scan: `timeout_seconds` should outlast the longest scan. A lease
    Prefect could not renew (its server busy or restarting) does not stop the scan: the worst
    outcome is a second scan of the same bytes, never a wrong verdict."""
    with _one_slot(scan_limit_name(sha256, settings_hash), timeout_seconds, stop_on_lost_lease=False):
        yield
