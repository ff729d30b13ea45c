"""The receiver under load, as users run it: `trojanscan serve` against a real `prefect server
start` on loopback (process helpers in tests/stack.py, load driver in benchmarks/webhook_load.py,
which runs the same with 2000 deliveries).

What must hold: every genuine alias/version delivery becomes exactly one Prefect event (counted
in the server by the delivery id in its payload) even though the receiver is killed the moment
the load ends; no tag, forged, tampered, stale, replayed, oversized or garbage delivery becomes
one, and each gets its 4xx; /health keeps answering during the load. And with Prefect down a
genuine delivery is answered 503, not accepted and dropped, so MLflow's retry gets it through.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from benchmarks.webhook_load import SECRET, _delivery, count_events, print_figures, run_load
from tests import stack

DELIVERIES = 400  # about 20 s with the servers' start on 2 cores


def test_load_every_genuine_delivery_is_one_event_and_nothing_else(tmp_path: Path) -> None:
    figures = run_load(tmp_path, DELIVERIES, clients=4).figures()
    print_figures(figures)
    assert figures["deliveries"] == DELIVERIES
    assert figures["wrong_statuses"] == []
    assert all(row["sent"] > 0 for row in figures["by_kind"].values())  # every kind was exercised
    assert figures["events_expected"] > 0
    assert figures["genuine_with_one_event"] == figures["events_expected"]
    assert figures["genuine_missing"] == [] and figures["genuine_duplicated"] == []
    assert figures["unexpected_events"] == []
    assert figures["events_counted"] == figures["events_expected"]
    health = figures["health"]
    assert health["probes"] >= 3 and health["failed"] == 0
    assert health["latency_ms"]["max"] < 2000  # loose: a shared 2-core machine, but never stuck
    stats = figures["receiver_stats"]
    assert stats["accepted"] == figures["events_expected"] and stats["failed"] == 0


def test_prefect_down_gives_503_and_the_retry_one_event(tmp_path: Path) -> None:
    env = stack.base_env(tmp_path)
    prefect_port, receiver_port = stack.free_ports(2)
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    env.update({"PREFECT_API_URL": api_url, "TROJANSCAN_WEBHOOK_SECRET": SECRET})
    receiver = stack.receiver(tmp_path, receiver_port, env)
    prefect = stack.prefect_server(tmp_path, prefect_port, env)
    url = f"http://127.0.0.1:{receiver_port}/webhooks/mlflow"
    try:
        receiver.start()  # Prefect is not running yet
        since = datetime.now(timezone.utc) - timedelta(seconds=5)
        delivery_id, body, headers = _delivery("alias_created", 1, [])
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 503
        prefect.start()
        # MLflow retries the same delivery (same id, timestamp and signature)
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 409
        deadline = time.monotonic() + 30
        while (found := count_events(api_url, since))[delivery_id] < 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert dict(found) == {delivery_id: 1}
    except Exception:
        for service in (receiver, prefect):
            print(f"--- {service.name} ---\n{service.log_tail()}")
        raise
    finally:
        receiver.stop()
        prefect.stop()
