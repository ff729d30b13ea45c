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
import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

logger = logging.getLogger("trojanscan.locking")

CLAIM_LIMIT = "trojanscan-claim"
SCAN_LIMIT = "trojanscan-scan"
BUCKETS = 64
# the shortest lease the server takes: a holder killed inside frees the slot within a minute;
# a live holder renews its lease in the background (_LeaseRenewal)
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


class _LeaseRenewal:
    """Renews a lease every LEASE_SECONDS * 0.75 from a daemon thread until stopped; its API
    client is opened only when the first renewal is due, so a lock held for less (every claim,
    most scans) costs no extra request. A failed renewal is logged and tried again next period:
    a lost claim lease is caught by the gate's claim check, a lost scan lease at worst lets a
    second scan of the same bytes start."""

    period = LEASE_SECONDS * 0.75

    def __init__(self, lease_id: UUID, limit_name: str) -> None:
        self.lease_id, self.limit_name = lease_id, limit_name
        self.stopped = threading.Event()
        # threads start with empty context variables: carry the caller's Prefect settings over
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._renew_until_stopped,),
                                       name=f"lease-{limit_name}", daemon=True)

    def __enter__(self) -> _LeaseRenewal:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # wait out a renewal already in flight, so none reaches the server after the release
        self.stopped.set()
        self.thread.join(timeout=10)

    def _renew_until_stopped(self) -> None:
        with contextlib.ExitStack() as opened:
            client = None
            while not self.stopped.wait(self.period):
                try:
                    client = client or opened.enter_context(get_client(sync_client=True))
                    client.renew_concurrency_lease(self.lease_id, lease_duration=LEASE_SECONDS)
                except Exception as error:  # the server busy or restarting: next period
                    logger.warning("could not renew the lease on %s: %s", self.limit_name, error)


def _acquire(client: SyncPrefectClient, limit_name: str, timeout_seconds: float) -> UUID:
    """Take the limit's slot with a lease; wait the Retry-After Prefect sends while it is busy.
    A limit nobody created yet (a worker started from prefect.yaml rather than `trojanscan
    worker`) is created on the first attempt that finds it missing."""
    deadline = time.monotonic() + timeout_seconds
    created = False
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[limit_name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=_holder())
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 423:  # 423 Locked: someone holds it
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"lock {limit_name} not free within {timeout_seconds:g} s") from None
            time.sleep(min(float(error.response.headers.get("Retry-After", 1.0)), remaining))
            continue
        granted = response.json()
        if granted.get("limits"):
            return UUID(granted["lease_id"])
        with contextlib.suppress(Exception):  # a lease on nothing: give it back
            client.release_concurrency_slots_with_lease(UUID(granted["lease_id"]))
        if created:
            raise RuntimeError(f"lock {limit_name}: the concurrency limit could not be created")
        ensure_limit(limit_name, client)
        created = True


def _holder() -> ConcurrencyLeaseHolder | None:
    """The flow run taking the lock, shown with the lease in Prefect."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)


@contextlib.contextmanager
def _one_slot(limit_name: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the limit's slot: one API client, one request to take it and one to give it back.

    Why not `prefect.concurrency.sync.concurrency`: per use it opened a client for the
    acquisition, one for the release and one for a lease renewal it sends at once, started two
    threads and emitted two events: 13-15 ms of CPU here and 20-28 ms on the Prefect server per
    lock, 80-180 ms of wall time (side by side against a local server, 2 CPU cores), twice in
    every scan while a burst of scans waits for worker slots."""
    with get_client(sync_client=True) as client:
        lease_id = _acquire(client, limit_name, timeout_seconds)
        try:
            with _LeaseRenewal(lease_id, limit_name):
                yield
        finally:
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except Exception as error:  # the lease then runs out within LEASE_SECONDS
                logger.warning("could not release the lock %s: %s", limit_name, error)


@contextlib.contextmanager
def claim_lock(name: str, version: str) -> Iterator[None]:
    with _one_slot(claim_limit_name(name, version), timeout_seconds=120):
        yield


@contextlib.contextmanager
def scan_lock(sha256: str, settings_hash: str, timeout_seconds: float) -> Iterator[None]:
    """Held through a whole scan: `timeout_seconds` should outlast the longest scan. A lease
    Prefect could not renew (its server busy or restarting) does not stop the scan: the worst
    outcome is a second scan of the same bytes, never a wrong verdict."""
    with _one_slot(scan_limit_name(sha256, settings_hash), timeout_seconds):
        yield
