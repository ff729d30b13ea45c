"""Webhook load: the real receiver under a bounded mix of genuine and hostile deliveries.

    python benchmarks/webhook_load.py [--deliveries 2000] [--clients 4]

Starts a real Prefect server and the receiver (`trojanscan serve`, as users start it) on
loopback, then fires deliveries from a few concurrent clients: genuine ones (MLflow's
`model_version_alias.created`, `model_version.created` and `model_version_tag.set`) mixed with
forged (wrong secret), tampered (body changed after signing), stale (an hour old), replayed
(an accepted delivery sent again), oversized (over the receiver's body limit) and garbage
(signed, not a webhook payload) ones, while a probe polls `/health`. The receiver is killed
(SIGKILL) as soon as the last answer arrives, so an event it had only buffered would be lost,
and the Prefect server's events API is asked which deliveries became `trojanscan.mlflow.*`
events: each genuine alias/version delivery must be exactly one event (found by the
`delivery_id` in its payload), a tag delivery or a rejected one none.
Writes benchmarks/results/webhook_load.{json,md}.

`run_load` is also what `tests/test_webhook_load.py` runs, with a smaller count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanner.webhooks import sign  # noqa: E402
from tests import stack  # noqa: E402

SECRET = "load-" + uuid.uuid4().hex
# kind -> (share of the deliveries, expected HTTP status, becomes a Prefect event)
MIX: dict[str, tuple[float, int, bool]] = {
    "alias_created": (0.30, 200, True),
    "version_created": (0.20, 200, True),
    "tag_set": (0.10, 200, False),  # acknowledged and dropped: the product does not act on tags
    "forged": (0.08, 401, False),
    "tampered": (0.08, 401, False),
    "stale": (0.08, 401, False),
    "replayed": (0.08, 409, False),
    "oversized": (0.03, 413, False),
    "garbage": (0.05, 400, False),
}
OVERSIZED_BYTES = 1_100_000  # just over the receiver's 1 MB limit


@dataclass
class Answer:
    """What one delivery was and how the receiver answered it."""

    kind: str
    delivery_id: str
    status: int
    seconds: float


@dataclass
class LoadOutcome:
    """Everything a load run measured; `figures()` is the JSON for the results file."""

    answers: list[Answer] = field(default_factory=list)
    health: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds) per probe
    events: Counter[str] = field(default_factory=Counter)  # delivery id -> trojanscan events seen
    receiver_stats: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    count_seconds: float = 0.0
    clients: int = 0

    def expected_events(self) -> set[str]:
        return {a.delivery_id for a in self.answers if MIX[a.kind][2]}

    def wrong_statuses(self) -> list[dict[str, Any]]:
        return [{"kind": a.kind, "delivery_id": a.delivery_id, "status": a.status, "expected": MIX[a.kind][1]}
                for a in self.answers if a.status != MIX[a.kind][1]]

    def figures(self) -> dict[str, Any]:
        expected = self.expected_events()
        latencies = np.array([a.seconds for a in self.answers]) * 1000
        health_ms = np.array([s for _, s in self.health]) * 1000
        kinds = Counter(a.kind for a in self.answers)
        return {
            "deliveries": len(self.answers),
            "clients": self.clients,
            "by_kind": {kind: {"sent": kinds[kind], "expected_status": MIX[kind][1],
                               "statuses": dict(Counter(str(a.status) for a in self.answers if a.kind == kind))}
                        for kind in MIX},
            "wrong_statuses": self.wrong_statuses(),
            "events_expected": len(expected),
            "events_counted": sum(self.events.values()),
            "genuine_with_one_event": sum(1 for d in expected if self.events[d] == 1),
            "genuine_missing": sorted(d for d in expected if self.events[d] == 0),
            "genuine_duplicated": sorted(d for d in expected if self.events[d] > 1),
            "unexpected_events": sorted(d for d in self.events if d not in expected),
            "latency_ms": _percentiles(latencies),
            "health": {"probes": len(self.health), "failed": sum(1 for s, _ in self.health if s != 200),
                       "latency_ms": _percentiles(health_ms)},
            "receiver_stats": self.receiver_stats,
            "load_seconds": round(self.load_seconds, 2),
            "deliveries_per_second": round(len(self.answers) / self.load_seconds, 1) if self.load_seconds else None,
            "count_seconds": round(self.count_seconds, 2),
        }


def _percentiles(values_ms: np.ndarray) -> dict[str, float | None]:
    if not len(values_ms):
        return {"p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(values_ms, [50, 95, 99])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1),
            "max": round(float(values_ms.max()), 1)}


def _body(kind: str, index: int) -> bytes:
    """An MLflow payload of the shape environment.md documents."""
    name, version = f"load-model-{index % 7}", str(1 + index % 50)
    if kind == "version_created":
        entity, action, data = "model_version", "created", {
            "name": name, "version": version, "source": f"models:/m-{index}", "run_id": uuid.uuid4().hex,
            "tags": {}, "description": ""}
    elif kind == "tag_set":
        entity, action, data = "model_version_tag", "set", {"name": name, "version": version, "key": "k",
                                                             "value": "v"}
    else:
        entity, action, data = "model_version_alias", "created", {"name": name, "alias": "candidate",
                                                                   "version": version}
    return json.dumps({"entity": entity, "action": action, "timestamp": datetime.now(timezone.utc).isoformat(),
                       "data": data}).encode()


def _headers(delivery_id: str, timestamp: int, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": str(timestamp),
            "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body), "Content-Type": "application/json"}


def _delivery(kind: str, index: int, accepted: list[tuple[str, bytes, dict[str, str]]]) -> tuple[str, bytes, dict[str, str]]:
    """(delivery id, body, headers) of one delivery of this kind, signed now."""
    now, delivery_id = int(time.time()), str(uuid.uuid4())
    if kind in ("alias_created", "version_created", "tag_set"):
        body = _body(kind, index)
        return delivery_id, body, _headers(delivery_id, now, body)
    if kind == "replayed":
        return accepted[index % len(accepted)]  # the same id, body and signature once more
    body = _body("alias_created", index)
    if kind == "forged":
        return delivery_id, body, _headers(delivery_id, now, body, secret="guessed-" + uuid.uuid4().hex[:8])
    if kind == "tampered":
        headers = _headers(delivery_id, now, body)
        return delivery_id, body.replace(b'"candidate"', b'"champion"'), headers
    if kind == "stale":
        return delivery_id, body, _headers(delivery_id, now - 3600, body)
    if kind == "oversized":
        padded = body[:-1] + b', "padding": "' + b"x" * OVERSIZED_BYTES + b'"}'
        return delivery_id, padded, _headers(delivery_id, now, padded)
    garbage = random.Random(index).randbytes(200)  # signed, so only the payload check can refuse it
    return delivery_id, garbage, _headers(delivery_id, now, garbage)


def plan(deliveries: int, seed: int = 0) -> list[str]:
    """The kinds in sending order: the exact share of each, shuffled; genuine ones first so that
    replays always have accepted deliveries to repeat."""
    counts = {kind: int(share * deliveries) for kind, (share, _, _) in MIX.items()}
    counts["alias_created"] += deliveries - sum(counts.values())
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(kinds)
    head = [k for k in kinds if k == "alias_created"][:10]
    for k in head:
        kinds.remove(k)
    return head + kinds


async def _fire(url: str, kinds: list[str], clients: int, outcome: LoadOutcome) -> None:
    """Send every delivery from `clients` concurrent connections; probe /health meanwhile."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(kinds):
        queue.put_nowait(item)
    accepted: list[tuple[str, bytes, dict[str, str]]] = []
    done = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not queue.empty():
                index, kind = queue.get_nowait()
                while kind == "replayed" and not accepted:
                    await asyncio.sleep(0.01)
                delivery_id, body, headers = _delivery(kind, index, accepted)
                started = time.perf_counter()
                response = await http.post(f"{url}/webhooks/mlflow", content=body, headers=headers)
                outcome.answers.append(Answer(kind, delivery_id, response.status_code, time.perf_counter() - started))
                if kind in ("alias_created", "version_created") and response.status_code == 200:
                    accepted.append((delivery_id, body, headers))

    async def probe() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    status = (await http.get(f"{url}/health")).status_code
                except httpx.HTTPError:
                    status = 0
                outcome.health.append((status, time.perf_counter() - started))
                await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe())
    await asyncio.gather(*(client() for _ in range(clients)))
    done.set()
    await prober


def count_events(api_url: str, since: datetime) -> Counter[str]:
    """`trojanscan.mlflow.*` events in the Prefect server since `since`, per payload delivery id."""
    found: Counter[str] = Counter()
    query = {"filter": {"event": {"prefix": ["trojanscan.mlflow."]}, "order": "ASC",
                        "occurred": {"since": since.isoformat(),
                                     "until": (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()}},
             "limit": 50}
    with httpx.Client(timeout=30) as http:
        page = http.post(f"{api_url}/events/filter", json=query).raise_for_status().json()
        while True:
            for event in page["events"]:
                found[str((event.get("payload") or {}).get("delivery_id"))] += 1
            if not page.get("next_page"):
                return found
            page = http.get(page["next_page"]).raise_for_status().json()


def run_load(root: Path, deliveries: int, clients: int = 4, seed: int = 0, settle_seconds: float = 60) -> LoadOutcome:
    """Start Prefect and the receiver under `root`, fire the load, stop the receiver, count events.

    Events reach the server's store a little after it accepted them, so the count is repeated
    until it stops changing (or `settle_seconds` pass)."""
    env = stack.base_env(root)
    prefect_port, receiver_port = stack.free_ports(2)
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    env.update({"PREFECT_API_URL": api_url, "TROJANSCAN_WEBHOOK_SECRET": SECRET})
    prefect = stack.prefect_server(root, prefect_port, env)
    receiver = stack.receiver(root, receiver_port, env)
    outcome = LoadOutcome(clients=clients)
    try:
        prefect.start()
        receiver.start()
        since = datetime.now(timezone.utc) - timedelta(seconds=5)
        url = f"http://127.0.0.1:{receiver_port}"
        started = time.perf_counter()
        asyncio.run(_fire(url, plan(deliveries, seed), clients, outcome))
        outcome.load_seconds = time.perf_counter() - started
        outcome.receiver_stats = httpx.get(f"{url}/stats", timeout=10).json()
        receiver.stop(signal.SIGKILL)  # no graceful exit: an event the receiver still held would be lost now
        started = time.perf_counter()
        expected = len(outcome.expected_events())
        deadline, previous = time.monotonic() + settle_seconds, -1
        while True:
            outcome.events = count_events(api_url, since)
            total = sum(outcome.events.values())
            if (total >= expected and total == previous) or time.monotonic() > deadline:
                break
            previous = total
            time.sleep(2)
        outcome.count_seconds = time.perf_counter() - started
    except Exception:
        for service in (prefect, receiver):
            print(f"--- {service.name} ---\n{service.log_tail()}")
        raise
    finally:
        receiver.stop()
        prefect.stop()
    return outcome


def print_figures(figures: dict[str, Any]) -> None:
    lat, health = figures["latency_ms"], figures["health"]
    print(f"{figures['deliveries']} deliveries from {figures['clients']} clients in {figures['load_seconds']} s "
          f"({figures['deliveries_per_second']}/s); receiver stats {figures['receiver_stats']}")
    for kind, row in figures["by_kind"].items():
        print(f"  {kind:16s} sent {row['sent']:5d}  expected {row['expected_status']}  got {row['statuses']}")
    print(f"Prefect events: expected {figures['events_expected']}, counted {figures['events_counted']}, "
          f"exactly one {figures['genuine_with_one_event']}, missing {len(figures['genuine_missing'])}, "
          f"duplicated {len(figures['genuine_duplicated'])}, unexpected {len(figures['unexpected_events'])} "
          f"(counted in {figures['count_seconds']} s)")
    print(f"latency ms: p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']}; "
          f"/health: {health['probes']} probes, {health['failed']} failed, p50 {health['latency_ms']['p50']} "
          f"max {health['latency_ms']['max']} ms; wrong statuses: {len(figures['wrong_statuses'])}")


def main() -> int:
    from benchmarks.results_file import markdown_table, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trojanscan-webhook-load-"))
    figures = run_load(root, args.deliveries, args.clients, args.seed).figures()
    print_figures(figures)
    lat, health = figures["latency_ms"], figures["health"]
    rows = [[kind, row["sent"], row["expected_status"], ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())]
            for kind, row in figures["by_kind"].items()]
    table = markdown_table(["kind", "sent", "expected", "answered"], rows) + "\n\n" + markdown_table(
        ["figure", "value"],
        [["deliveries / clients", f"{figures['deliveries']} / {figures['clients']}"],
         ["load seconds (deliveries/s)", f"{figures['load_seconds']} ({figures['deliveries_per_second']})"],
         ["wrong statuses", len(figures["wrong_statuses"])],
         ["Prefect events expected / counted", f"{figures['events_expected']} / {figures['events_counted']}"],
         ["genuine with exactly one event", figures["genuine_with_one_event"]],
         ["missing / duplicated / unexpected events",
          f"{len(figures['genuine_missing'])} / {len(figures['genuine_duplicated'])} / {len(figures['unexpected_events'])}"],
         ["latency ms p50 / p95 / p99 / max", f"{lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']}"],
         ["/health probes (failed), ms p50 / max",
          f"{health['probes']} ({health['failed']}), {health['latency_ms']['p50']} / {health['latency_ms']['max']}"]])
    write_results("webhook_load", figures, table)
    ok = (not figures["wrong_statuses"] and figures["genuine_with_one_event"] == figures["events_expected"]
          and not figures["unexpected_events"] and not health["failed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
