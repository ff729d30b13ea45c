"""Run one deployment's flow runs in processes forked from a warm parent (`trojanscan worker`).

Prefect's runner (`serve`) starts every flow run in a freshly spawned interpreter that imports
torch, onnx, MLflow and Prefect again: about 2.6 s of CPU on an idle 2-core machine, 5-6 s each
when 20 scans start together (the start-up column of benchmarks/results/registry_latency.md),
while the scan itself then takes under a second. Here a multiprocessing fork server imports
those modules once and each flow run is forked from it in about 20 ms. Every scan is still its
own process: a model that crashes its loader takes down only its own scan.

The runner claims the deployment's due runs itself with the Pending proposal Prefect's runner
makes, so two workers never start the same flow run, and the flow engine in the child reports
states, logs and artifacts to the Prefect server as in any other run. A run cancelled from the
Prefect UI or API (state Cancelling) has its process killed at the next poll and ends Cancelled;
the version keeps its `running` claim until it goes stale, and the registry watcher then requests
the scan again. A worker that dies leaves its runs Running, with the same outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import multiprocessing
import os
import threading
from datetime import datetime, timezone
from uuid import UUID

# imported once by the fork server: a forked scan starts with its modules loaded and its
# template compiled
PRELOAD = ["flows.warm_preload"]

# scans yield the CPU to the servers that turn the next events into flow runs (Prefect's
# automations, MLflow, the receiver), which share the machine in a single-host stack
SCAN_NICENESS = 10

logger = logging.getLogger("trojanscan.warm_runner")


def _load_flow(flow_path: str):  # "module:attribute"
    module, _, attribute = flow_path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def execute_flow_run(flow_path: str, flow_run_id: str, threads: int | None = None) -> None:
    """In the forked child: run the claimed (Pending) flow run with Prefect's flow engine, then
    send the queued logs and events (a forked child leaves with os._exit, skipping atexit).
    `threads` caps torch's intra-op threads (the fork server imported torch before any
    OMP_NUM_THREADS of ours could count)."""
    import torch
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.flow_engine import run_flow
    from prefect.logging.handlers import APILogWorker

    os.nice(SCAN_NICENESS)
    if threads:
        torch.set_num_threads(threads)
    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(flow_run_id))
        run_flow(_load_flow(flow_path), flow_run=flow_run, return_type="state")
    finally:
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


class WarmRunner:
    """Polls Prefect every `poll` s for due runs of `deployment_id` and runs at most `limit` at
    once, each in a process forked from the warm server."""

    def __init__(self, flow_path: str, deployment_id: UUID, limit: int = 4, poll: float = 2.0,
                 threads: int | None = None) -> None:
        self.flow_path, self.deployment_id, self.poll = flow_path, deployment_id, poll
        self.limit, self.threads = limit, threads
        self.stopping = threading.Event()
        self.wake = threading.Event()  # set when a slot frees: waiting runs start without waiting for the poll
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.running: dict[UUID, multiprocessing.process.BaseProcess | None] = {}  # None until forked
        self.cancelled: set[UUID] = set()

    def start(self) -> threading.Thread:
        """Start the fork server (the imports happen now, not on the first event), the poller,
        and the listener that wakes the poller when a run is scheduled."""
        warmup = self.context.Process(target=int)
        warmup.start()
        warmup.join()
        # threads start with empty context variables: carry the caller's Prefect settings over
        threading.Thread(target=contextvars.copy_context().run, args=(asyncio.run, self._listen()),
                         name="warm-runner-events", daemon=True).start()
        thread = threading.Thread(target=contextvars.copy_context().run, args=(self._poll_forever,),
                                  name="warm-runner", daemon=True)
        thread.start()
        return thread

    async def _listen(self) -> None:
        """Wake the poller when Prefect announces a new run of the deployment (its
        `prefect.flow-run.Scheduled` event): an idle worker then starts a triggered scan within a
        few hundred milliseconds instead of at its next poll (1 s later on average with the
        default 2 s; polling faster costs the Prefect server a query each time). The poll stays
        the fallback: a lost connection or a missed event only delays a run until it."""
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

        scheduled = EventFilter(event=EventNameFilter(name=["prefect.flow-run.Scheduled"]),
                                related=EventRelatedFilter(id=[f"prefect.deployment.{self.deployment_id}"]))
        while not self.stopping.is_set():
            try:
                async with get_events_subscriber(filter=scheduled, reconnect_on_clean_close=True) as subscriber:
                    async for _ in subscriber:
                        self.wake.set()
            except Exception as error:  # the server restarting: listen again after a poll interval
                logger.info("listening for scheduled runs failed (%s); polling meanwhile", error)
                await asyncio.sleep(self.poll)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _poll_forever(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not self.stopping.is_set():
                try:
                    self.poll_once(client)
                    self.stop_cancelled(client)
                except Exception:  # a Prefect server restart must not end the worker
                    logger.exception("polling Prefect for scheduled runs failed; retrying")
                self.wake.wait(self.poll)
                self.wake.clear()

    def poll_once(self, client) -> list[UUID]:
        """Claim and start the due runs that fit in the free slots; returns their ids."""
        from prefect.states import Pending
        from prefect.utilities.engine import propose_state_sync

        free = self.limit - len(self.running)
        if free <= 0:
            return []
        runs = client.get_scheduled_flow_runs_for_deployments(
            [self.deployment_id], scheduled_before=datetime.now(timezone.utc), limit=free)
        started = []
        for run in sorted(runs, key=lambda r: r.next_scheduled_start_time or r.created):
            if run.id in self.running:
                continue
            try:
                claimed = propose_state_sync(client, Pending(), flow_run_id=run.id).is_pending()
            except Exception as error:  # Abort: another runner claimed it first
                logger.info("flow run %s not claimed: %s", run.id, error)
                claimed = False
            if not claimed:
                continue
            self.running[run.id] = None
            threading.Thread(target=contextvars.copy_context().run, args=(self._supervise, run.id), daemon=True).start()
            started.append(run.id)
        return started

    def stop_cancelled(self, client) -> list[UUID]:
        """Kill the processes of running runs that someone asked to cancel (the Prefect UI or API
        set them Cancelling); their supervisors then mark them Cancelled. Returns their ids."""
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                                    FlowRunFilterStateType)
        from prefect.client.schemas.objects import StateType

        active = [run_id for run_id, process in list(self.running.items()) if process is not None]
        if not active:
            return []
        cancelling = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=active), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING]))))
        for run in cancelling:
            self.cancelled.add(run.id)
            process = self.running.get(run.id)
            if process is not None:
                process.kill()
        return [run.id for run in cancelling]

    def _supervise(self, flow_run_id: UUID) -> None:
        """Fork the run's process and wait for it; a run whose process was stopped on request
        ends Cancelled, one whose process died unfinished ends Crashed."""
        from prefect.states import Cancelled, Crashed

        try:
            process = self.context.Process(target=execute_flow_run,
                                           args=(self.flow_path, str(flow_run_id), self.threads),
                                           name=f"flow-run-{flow_run_id}")
            process.start()
            self.running[flow_run_id] = process
            process.join()
            if flow_run_id in self.cancelled:
                self._finish(flow_run_id, Cancelled(message="cancelled: the scan process was stopped"))
            elif process.exitcode != 0:
                self._finish(flow_run_id, Crashed(message=f"the scan process exited with code {process.exitcode}"))
        except Exception as error:
            self._finish(flow_run_id, Crashed(message=f"could not start the scan process: {error}"))
        finally:
            self.running.pop(flow_run_id, None)
            self.cancelled.discard(flow_run_id)
            self.wake.set()

    @staticmethod
    def _finish(flow_run_id: UUID, state) -> None:
        """Give a run whose process is gone its final state, unless it reported one itself."""
        from prefect.client.orchestration import get_client
        from prefect.utilities.engine import propose_state_sync

        try:
            with get_client(sync_client=True) as client:
                if not client.read_flow_run(flow_run_id).state.is_final():
                    propose_state_sync(client, state, flow_run_id=flow_run_id)
                    logger.warning("flow run %s: %s", flow_run_id, state.message)
        except Exception:
            logger.exception("could not set the final state of flow run %s", flow_run_id)
