"""The claim and scan locks (flows/locking.py) against a real Prefect server: flows for the same
version, or the same model bytes, wait for each other; flows in other buckets do not."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from flows.locking import BUCKETS, claim_limit_name, claim_lock, ensure_lock_limits, scan_limit_name, scan_lock


def test_claim_limit_names_are_stable_per_version_and_spread_over_the_buckets() -> None:
    assert claim_limit_name("model", "7") == claim_limit_name("model", "7")
    names = {claim_limit_name("model", str(version)) for version in range(1, 21)}
    assert len(names) >= 12, "20 versions should land in many of the 64 buckets, not queue on a few"
    assert all(0 <= int(name.rsplit("-", 1)[1]) < BUCKETS for name in names)
    assert claim_limit_name("a", "12") != claim_limit_name("a1", "2"), "name and version are kept apart"


def _other_bucket(name: str, version: str) -> str:
    taken = claim_limit_name(name, version)
    return next(str(v) for v in range(1000) if claim_limit_name(name, str(v)) != taken)


def _second_holder_waits(lock: Callable[[], contextlib.AbstractContextManager[Any]],
                         while_held: Callable[[], None] = lambda: None) -> None:
    """Hold `lock()` in one thread and run `while_held`; then check that `lock()` taken in a second
    thread waits until the first is released, and gets it then."""
    holding, release, got_second = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            holding.set()
            release.wait(30)

    def second() -> None:
        with lock():
            got_second.set()

    # threads start with empty context variables: carry the test's Prefect settings over
    holder = threading.Thread(target=contextvars.copy_context().run, args=(hold,))
    holder.start()
    try:
        assert holding.wait(60), "the first holder got its slot"
        while_held()
        waiter = threading.Thread(target=contextvars.copy_context().run, args=(second,))
        waiter.start()
        assert not got_second.wait(2.0), "a second holder of the same key must wait for the first"
        release.set()
        waiter.join(60)
        assert got_second.is_set(), "and gets the slot once the first is released"
    finally:
        release.set()
        holder.join(60)


def test_the_same_version_waits_and_another_bucket_does_not(prefect_api: str) -> None:
    other_waits: list[float] = []

    def claim_another_bucket() -> None:
        started = time.monotonic()
        with claim_lock("locked-model", _other_bucket("locked-model", "1")):
            other_waits.append(time.monotonic() - started)

    _second_holder_waits(lambda: claim_lock("locked-model", "1"), claim_another_bucket)
    assert other_waits[0] < 2.0, f"a version in another bucket waited {other_waits[0]:.1f} s"


def test_the_worker_creates_every_bucket_up_front(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    ensure_lock_limits()
    ensure_lock_limits()  # a second worker start finds them and creates nothing
    with get_client(sync_client=True) as client:
        slots = {limit.name: limit.limit for limit in client.read_global_concurrency_limits(limit=200)}
    for limit_name in (claim_limit_name, scan_limit_name):
        buckets = {limit_name("any", str(v)) for v in range(500)}
        assert len(buckets) == BUCKETS and buckets <= slots.keys()
        assert {slots[name] for name in buckets} == {1}, "one holder at a time per bucket"
    assert not {claim_limit_name("a", "1")} & {scan_limit_name("a", "1")}, "the two locks never share a slot"


def test_the_scan_lock_keeps_a_second_scan_of_the_same_bytes_waiting(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    sha256, settings = "ab" * 32, "settings-for-the-lock-test"
    with get_client(sync_client=True) as client:  # a worker started from prefect.yaml created none
        with contextlib.suppress(Exception):
            client.delete_global_concurrency_limit_by_name(scan_limit_name(sha256, settings))
    _second_holder_waits(lambda: scan_lock(sha256, settings, timeout_seconds=60))
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(scan_limit_name(sha256, settings)).limit == 1, \
            "the missing limit was created, with one slot"


def test_a_held_lock_renews_its_lease_and_a_released_one_is_free_at_once(prefect_api: str, monkeypatch, caplog) -> None:
    """The renewal thread really calls the server (a renewal it could not make is a warning),
    stops with the lock, and the release frees the slot for the next holder without waiting."""
    from prefect.client.orchestration import SyncPrefectClient

    import flows.locking as locking

    renewals: list[object] = []
    renew = SyncPrefectClient.renew_concurrency_lease

    def counted(self, lease_id, lease_duration):  # the real call, counted
        renewals.append(lease_id)
        return renew(self, lease_id, lease_duration)

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", counted)
    monkeypatch.setattr(locking._LeaseRenewal, "period", 0.2)
    ensure_lock_limits()
    with caplog.at_level("WARNING", logger="trojanscan.locking"):
        with scan_lock("cd" * 32, "renewal-test", timeout_seconds=30):
            time.sleep(1.0)
        held = len(renewals)
        time.sleep(0.6)
        started = time.monotonic()
        with scan_lock("cd" * 32, "renewal-test", timeout_seconds=30):
            waited = time.monotonic() - started
    assert held >= 2, f"a lock held 1 s with a 0.2 s period renewed {held} times"
    assert len(renewals) <= held + 1, "renewals stop once the lock is given back"
    assert waited < 1.0, f"the released slot was taken again after {waited:.2f} s"
    assert not [r for r in caplog.records if "renew" in r.getMessage()], "every renewal was accepted"


def test_a_lock_not_free_within_its_timeout_raises_timeout_error(prefect_api: str) -> None:
    import pytest

    sha256, settings = "ef" * 32, "timeout-test"
    ensure_lock_limits()
    with scan_lock(sha256, settings, timeout_seconds=30):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="not free within"):
            with scan_lock(sha256, settings, timeout_seconds=1.5):
                pass
        waited = time.monotonic() - started
    assert waited < 10, f"gave up after {waited:.1f} s on a 1.5 s timeout"
    with scan_lock(sha256, settings, timeout_seconds=5):  # free again once the holder left
        pass
