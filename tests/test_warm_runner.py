"""The worker's warm runner (flows/warm_runner.py) against a real Prefect server: it claims a
deployment's scheduled runs, runs each in its own forked process, respects its limit, and marks
a run whose process died Crashed while it goes on serving."""

from __future__ import annotations

import os
import time
from pathlib import Path
from uuid import UUID

import pytest


def _deployment(flow_object) -> UUID:
    return flow_object.to_deployment(name=f"{flow_object.name}-test").apply()


def _schedule(deployment_id: UUID, parameters: dict, count: int = 1) -> list[UUID]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id for _ in range(count)]


def _final_state(flow_run_id: UUID, timeout: float = 90):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def test_runs_scheduled_runs_in_forked_processes_within_its_limit(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.warm_runner import WarmRunner
    from tests.warm_flows import writes_pid

    deployment_id = _deployment(writes_pid)
    pid_files = [tmp_path / f"pid-{k}" for k in range(2)]
    runs = [_schedule(deployment_id, {"path": str(path)})[0] for path in pid_files]
    runner = WarmRunner("tests.warm_flows:writes_pid", deployment_id, limit=1, poll=0.5)
    with get_client(sync_client=True) as client:
        first = runner.poll_once(client)
        assert len(first) == 1, "a runner with limit 1 starts one run at a time"
        assert runner.poll_once(client) == [], "no free slot while the first run is going"
        assert _final_state(first[0]).is_completed()
        deadline = time.monotonic() + 10
        while runner.running and time.monotonic() < deadline:  # the supervisor frees the slot
            time.sleep(0.1)
        second = runner.poll_once(client)
    assert set(first + second) == set(runs)
    assert _final_state(second[0]).is_completed()
    pids = {int(path.read_text()) for path in pid_files}
    assert len(pids) == 2 and os.getpid() not in pids, "each run has its own process, not the worker's"


def test_a_scheduled_run_wakes_the_runner_before_its_next_poll(prefect_api: str, tmp_path: Path) -> None:
    from flows.warm_runner import WarmRunner
    from tests.warm_flows import writes_pid

    deployment_id = _deployment(writes_pid)
    runner = WarmRunner("tests.warm_flows:writes_pid", deployment_id, limit=2, poll=120)
    runner.start()
    try:
        time.sleep(5)  # the first poll (nothing due) is done and the listener is subscribed
        started = time.monotonic()
        run = _schedule(deployment_id, {"path": str(tmp_path / "pid")})[0]
        assert _final_state(run, timeout=60).is_completed()
        assert time.monotonic() - started < 30, "started on the Scheduled event, not the 120 s poll"
    finally:
        runner.stop()


def test_a_run_whose_process_dies_is_marked_crashed_and_the_runner_goes_on(prefect_api: str, tmp_path: Path) -> None:
    from flows.warm_runner import WarmRunner
    from tests.warm_flows import dies, writes_pid

    dead = _schedule(_deployment(dies), {"code": 3})[0]
    runner = WarmRunner("tests.warm_flows:dies", _deployment(dies), limit=2, poll=0.3)
    runner.start()
    try:
        state = _final_state(dead)
        assert state.is_crashed()
        assert "exited with code 3" in (state.message or "")
    finally:
        runner.stop()
    # the same process serves another deployment afterwards: the fork server survived the crash
    deployment_id = _deployment(writes_pid)
    ok = _schedule(deployment_id, {"path": str(tmp_path / "pid")})[0]
    other = WarmRunner("tests.warm_flows:writes_pid", deployment_id, limit=1, poll=0.3)
    other.start()
    try:
        assert _final_state(ok).is_completed()
    finally:
        other.stop()


def test_a_run_gets_the_torch_threads_it_was_given(prefect_api: str, tmp_path: Path) -> None:
    from flows.warm_runner import WarmRunner
    from tests.warm_flows import writes_threads

    threads = (os.cpu_count() or 1) + 1  # not torch's default, so the runner must have set it
    deployment_id = _deployment(writes_threads)
    run_id = _schedule(deployment_id, {"path": str(tmp_path / "threads")})[0]
    runner = WarmRunner("tests.warm_flows:writes_threads", deployment_id, limit=1, poll=0.3, threads=threads)
    runner.start()
    try:
        assert _final_state(run_id).is_completed()
    finally:
        runner.stop()
    assert int((tmp_path / "threads").read_text()) == threads


def test_scan_threads_share_the_cores_among_the_worker_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serve import scan_threads

    monkeypatch.delenv("TROJANSCAN_SCAN_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [scan_threads(limit) for limit in (1, 4, 16, 32)] == [16, 4, 1, 1]
    monkeypatch.setenv("TROJANSCAN_SCAN_THREADS", "3")
    assert scan_threads(4) == 3


def test_a_plain_http_api_spares_the_scans_parsing_every_ca_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import skip_unused_certificate_parsing

    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "")  # restored after the test: the function sets it
    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE")
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example/api"}):
        assert not skip_unused_certificate_parsing() and "PREFECT_API_SSL_CERT_FILE" not in os.environ
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert skip_unused_certificate_parsing()
    bundle = Path(os.environ["PREFECT_API_SSL_CERT_FILE"])
    assert bundle.read_text().count("BEGIN CERTIFICATE") == 1
    assert ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"] == 1
    # a process started from the worker builds its Prefect clients with it (and still works)
    code = ("from prefect.client.orchestration import get_client\n"
            "client = get_client(sync_client=True)\n"
            "print(client._client._transport._pool._ssl_context.cert_store_stats()['x509_ca'])")
    env = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:4200/api")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-500:]


def test_a_run_cancelled_in_prefect_has_its_process_stopped(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from flows.warm_runner import WarmRunner
    from tests.warm_flows import sleeps

    deployment_id = _deployment(sleeps)
    pid_file = tmp_path / "pid"
    run_id = _schedule(deployment_id, {"path": str(pid_file)})[0]
    runner = WarmRunner("tests.warm_flows:sleeps", deployment_id, limit=1, poll=0.3)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = int(pid_file.read_text())
        with get_client(sync_client=True) as client:  # what the UI's cancel button does
            client.set_flow_run_state(run_id, Cancelling())
        state = _final_state(run_id, timeout=30)  # the flow itself would sleep 120 s
        assert state.is_cancelled()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the scan process is gone"
    finally:
        runner.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
