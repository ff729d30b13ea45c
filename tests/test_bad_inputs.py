"""Bad clean data and exceeded budgets fail closed, through the CLI and through the gate.

Each bad data set (NaN pixels, wrong image shape, labels beyond the model's classes, too few
images per class, a data set that belongs to another model) must give `trojanscan scan` exit 2
with one line on stderr, and give a registry version status `error` with the reason, never the
target alias. A scan over its policy's time or memory budget ends the same way, never `clean`.

"Another model's data" is real: scikit-learn's 8x8 handwritten digits, scaled to 28x28 with
labels 0-9, fed to the Fashion-MNIST classifier: same shape, same label range, every format
check passes, and the model labels about a tenth of it right.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scanner.data import CleanData
from scanner.errors import DataError
from scanner.scan import ScanSettings, check_clean_accuracy

MODEL_ID = "fm-clean-s0"


def _nan(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.copy()
    x[3, 0, 10, 10] = np.nan
    return x, y


def _rgb(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(x, 3, axis=1), y  # a colour data set for a greyscale model


def _labels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x, y + 3  # labels 3..12 for a 10-class model


def _few(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(y == k)[:3] for k in range(10)])  # 3 per class, every class present
    return x[keep], y[keep]


def _other_model(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images[:500] / 16.0).astype(np.float32)  # 8x8 in [0, 1]
    big = np.zeros((len(small), 1, 28, 28), dtype=np.float32)
    big[:, 0, 2:26, 2:26] = np.kron(small, np.ones((3, 3), dtype=np.float32))  # centred like MNIST
    return big, digits.target[:500].astype(np.int64)


# case -> (how the clean samples are spoiled, words the one-line reason must contain)
BAD_DATA: dict[str, tuple[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], str]] = {
    "nan": (_nan, "NaN"),
    "wrong shape": (_rgb, "shape"),
    "label range": (_labels, "classes"),
    "too few per class": (_few, "at least 5 per class"),
    "another model's data": (_other_model, "another model"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> dict[str, Path]:
    """One npz per bad case, made from the smoke zoo's clean samples (np.savez: no validation on write)."""
    zoo_dir, _ = fm_smoke_zoo
    folder = tmp_path_factory.mktemp("bad-data")
    with np.load(zoo_dir / "clean_samples.npz") as npz:
        x, y = npz["x"], npz["y"]
    files = {}
    for case, (spoil, _) in BAD_DATA.items():
        bad_x, bad_y = spoil(x, y)
        files[case] = folder / f"{case.replace(' ', '_').replace(chr(39), '')}.npz"
        np.savez(files[case], x=bad_x, y=bad_y)
    return files


def _model(fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> Path:
    zoo_dir, manifest = fm_smoke_zoo
    entry = next(m for m in manifest["models"] if m["id"] == MODEL_ID)
    return zoo_dir / entry["files"]["onnx"]["path"]


# -- the accuracy floor ---------------------------------------------------------------------------
def test_accuracy_floor_and_its_setting() -> None:
    assert ScanSettings().accuracy_floor(10) == 0.5 and ScanSettings().accuracy_floor(43) == 0.5
    assert ScanSettings().accuracy_floor(3) == pytest.approx(2 / 3)  # twice chance beats 0.5 for 3 classes
    assert ScanSettings(min_clean_accuracy=0.2).accuracy_floor(10) == 0.2
    # the automatic floor is not in the dump, so settings hashes of earlier scans stay valid
    assert "min_clean_accuracy" not in ScanSettings().model_dump(mode="json")
    assert ScanSettings(min_clean_accuracy=0.0).model_dump(mode="json")["min_clean_accuracy"] == 0.0


def test_clean_accuracy_check_on_own_and_foreign_data(fm_smoke_zoo: tuple[Path, dict[str, Any]],
                                                      bad_files: dict[str, Path]) -> None:
    from scanner.model_io import load_model

    zoo_dir, _ = fm_smoke_zoo
    module = load_model(_model(fm_smoke_zoo)).module
    own = check_clean_accuracy(module, CleanData.load_npz(zoo_dir / "clean_samples.npz"), 10, ScanSettings())
    assert own > 0.7
    foreign = CleanData.load_npz(bad_files["another model's data"])
    with pytest.raises(DataError, match="another model") as caught:
        check_clean_accuracy(module, foreign, 10, ScanSettings())
    assert "\n" not in str(caught.value)
    assert check_clean_accuracy(module, foreign, 10, ScanSettings(min_clean_accuracy=0)) < 0.3  # check off


# -- through the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_bad_data_exits_2_with_one_line(case: str, fm_smoke_zoo: tuple[Path, dict[str, Any]],
                                           bad_files: dict[str, Path], tmp_path: Path) -> None:
    import json

    done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", str(_model(fm_smoke_zoo)), "--data",
                           str(bad_files[case]), "--detectors", "ni", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (case, done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("trojanscan: error:"), done.stderr
    assert BAD_DATA[case][1] in lines[0], lines[0]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "error" and BAD_DATA[case][1] in result["reasons"][0]


def test_cli_floors_are_settings(fm_smoke_zoo: tuple[Path, dict[str, Any]], bad_files: dict[str, Path],
                                 tmp_path: Path) -> None:
    """Lowered on the command line, the floors let the same data through (and are recorded)."""
    import json

    for case, option in (("too few per class", "--min-images-per-class=3"),
                         ("another model's data", "--min-clean-accuracy=0")):
        done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", str(_model(fm_smoke_zoo)), "--data",
                               str(bad_files[case]), "--detectors", "ni", option, "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 1), (case, done.stderr)
        settings = json.loads((tmp_path / "r.json").read_text())["settings"]
        key, value = option.lstrip("-").replace("-", "_").split("=")
        assert settings[key] == float(value), settings


# -- through the gate -----------------------------------------------------------------------------
POLICY = """\
defaults:
  detectors: [ni]
  threshold: 3.5
models:
  bad-data: {}
  tight-time: {max_scan_seconds: 0.001}
  tight-memory: {max_memory_mb: 1}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A local SQLite MLflow store and the policy above."""
    from scanner.policy import load_policy
    from tests.stack import local_store

    root = tmp_path_factory.mktemp("bad-inputs-registry")
    uri = local_store(root)
    (root / "policy.yaml").write_text(POLICY)
    return {"uri": uri, "root": root, "policy": load_policy(root / "policy.yaml")}


def _request(store: dict[str, Any], model: Path, name: str, clean_data: Path | None,
             zoo_dir: Path) -> tuple[Any, str]:
    """Register the model under `name` (its run carries the good clean samples), point the
    version at `clean_data` when given, and request its promotion with @candidate."""
    from scanner.registry import CLEAN_DATA, Registry
    from tests.stack import register_onnx

    registry = Registry(store["uri"])
    version = register_onnx(model, zoo_dir / "clean_samples.npz", name)
    if clean_data is not None:
        registry.set_tags(name, version, {CLEAN_DATA: str(clean_data)})  # the tag wins over the run's samples
    registry.set_alias(name, "candidate", version)
    return registry, version


def _assert_error_not_promoted(registry: Any, name: str, version: str, outcome: Any, words: str) -> None:
    assert outcome.status == "error" and not outcome.promoted, outcome
    tags = registry.get_version(name, version).tags
    assert tags["trojanscan.status"] == "error"
    assert words in tags["trojanscan.error"] and "\n" not in tags["trojanscan.error"]
    assert "trojanscan.verdict" not in tags or tags["trojanscan.verdict"] != "clean"
    assert registry.alias_version(name, "champion") != version


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_gate_bad_data_ends_error_not_promoted(case: str, store: dict[str, Any], bad_files: dict[str, Path],
                                              fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> None:
    from scanner.gate import scan_version

    registry, version = _request(store, _model(fm_smoke_zoo), "bad-data", bad_files[case], fm_smoke_zoo[0])
    outcome = scan_version(registry, store["policy"], "bad-data", version, store["root"] / "work")
    _assert_error_not_promoted(registry, "bad-data", version, outcome, BAD_DATA[case][1])


@pytest.mark.parametrize("name, words", [("tight-time", "more than 0.001 s"), ("tight-memory", "peak memory")])
def test_gate_budget_exceeded_ends_error_never_clean(name: str, words: str, store: dict[str, Any],
                                                     fm_smoke_zoo: tuple[Path, dict[str, Any]]) -> None:
    """The clean model with its own good data would scan clean; over budget it must not."""
    from scanner.gate import scan_version

    registry, version = _request(store, _model(fm_smoke_zoo), name, None, fm_smoke_zoo[0])
    outcome = scan_version(registry, store["policy"], name, version, store["root"] / "work")
    _assert_error_not_promoted(registry, name, version, outcome, "scan budget exceeded")
    assert words in registry.get_version(name, version).tags["trojanscan.error"]
