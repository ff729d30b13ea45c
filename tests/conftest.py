"""Shared fixtures: small models trained once per test session (seconds each), and a real
Prefect server per test module that asks for one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import stack

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fm_smoke_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The Fashion-MNIST smoke zoo (one clean, one trojaned model), built once."""
    from scanner.zoo import build_zoo

    out = tmp_path_factory.mktemp("zoo-fm-smoke")
    return out, build_zoo("fashion-mnist", "smoke", out)


@pytest.fixture(scope="session")
def smoke_models(fm_smoke_zoo):
    """(zoo folder, models by id, its clean data, load(model_id) -> the torch.export module)."""
    from scanner.data import CleanData

    out_dir, manifest = fm_smoke_zoo
    models = {entry["id"]: entry for entry in manifest["models"]}
    data = CleanData.load_npz(out_dir / "clean_samples.npz")

    def load(model_id: str) -> torch.nn.Module:
        return torch.export.load(str(out_dir / models[model_id]["files"]["pt2"]["path"])).module()

    return out_dir, models, data, load


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect-api")
    env = stack.base_env(root)
    port = stack.free_port()
    server = stack.prefect_server(root, port, env).start()
    url = f"http://127.0.0.1:{port}/api"
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # the fork server reads it when it starts
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
