"""Flows for tests/test_warm_runner.py, in their own module so the forked scan process can
import them by path the way the worker imports `flows.scan_version:scan_model_version`."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow


@flow(name="warm-test-writes-pid")
def writes_pid(path: str) -> None:
    Path(path).write_text(str(os.getpid()))


@flow(name="warm-test-dies")
def dies(code: int = 3) -> None:
    os._exit(code)  # what a crashing native loader looks like from outside: no state reported


@flow(name="warm-test-sleeps")
def sleeps(path: str, seconds: float = 120) -> None:
    import time

    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)


@flow(name="warm-test-writes-threads")
def writes_threads(path: str) -> None:
    import torch

    Path(path).write_text(str(torch.get_num_threads()))
