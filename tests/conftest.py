"""Session fixtures: small models trained once per test session (seconds each)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

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
