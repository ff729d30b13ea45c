"""`trojanscan scan` end to end on the smoke zoo, through the real console entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scanner.export import sha256_file


def run_cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanner.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else os.environ | env)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def smoke(fm_smoke_zoo):
    out, manifest = fm_smoke_zoo
    models = {entry["id"]: entry for entry in manifest["models"]}
    return out, models["fm-square4-br"], models["fm-clean-s0"]


def test_trojaned_model_is_flagged_with_its_target(smoke, tmp_path):
    out, trojan, _ = smoke
    model = out / trojan["files"]["onnx"]["path"]
    done = run_cli("scan", str(model), "--data", str(out / "clean_samples.npz"), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 1, done.stderr
    assert "INFECTED" in done.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["schema_version"] == 1 and result["verdict"] == "infected"
    assert result["model"]["sha256"] == sha256_file(model)
    for name in ("ni", "tabor"):
        detector = result["detectors"][name]
        assert 7 in detector["flagged_classes"], (name, detector["anomaly_index"])
        assert len(detector["anomaly_index"]) == 10 and detector["seconds"] > 0
        assert int(np.argmax(detector["anomaly_index"])) == 7
    assert 7 in result["flagged_classes"]
    files = result["detectors"]["tabor"]["artifacts"]["7"]
    mask = np.load(tmp_path / files["mask_npy"])
    assert mask.shape == (28, 28) and (tmp_path / files["stamped"]).is_file()
    # the restored trigger sits where the real one is: bottom-right 4x4 at rows/cols 23..26
    assert mask[20:28, 20:28].sum() > 0.5 * mask.sum()
    assert (tmp_path / result["detectors"]["ni"]["artifacts"]["7"]["saliency"]).is_file()
    probe = result["detectors"]["tabor"]["notes"]["device_probe"]  # slots sized on the timed batches
    assert probe["chosen_batch"] in {int(size) for size in probe["images_per_second"]}
    assert result["detectors"]["tabor"]["notes"]["precision"] == probe["precision"]


def test_a_scan_that_flags_nothing_exits_0_with_a_clean_verdict(smoke, tmp_path):
    # Exit-code plumbing only. Whether the default threshold keeps clean models clean is measured
    # by benchmarks/detection.py (false alarms are an open target of issue 4).
    out, _, clean = smoke
    done = run_cli("scan", str(out / clean["files"]["pt2"]["path"]), "--data", str(out / "clean_samples.npz"),
                   "--detectors", "ni", "--threshold", "1000", "--json", str(tmp_path / "r.json"),
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("CLEAN")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "clean" and result["flagged_classes"] == []
    assert result["settings"]["threshold"] == 1000 and len(result["detectors"]["ni"]["anomaly_index"]) == 10
    assert result["threads"] == 1  # recorded: the thread count changes the rounding


def bad_data(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(tmp_path / name, x=x, y=y)
    return str(tmp_path / name)


def test_bad_inputs_exit_2_with_one_line(smoke, tmp_path):
    out, trojan, _ = smoke
    model = str(out / trojan["files"]["onnx"]["path"])
    samples = np.load(out / "clean_samples.npz")
    x, y = samples["x"], samples["y"]
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    cases = {
        "missing data": ["scan", model],
        "data file absent": ["scan", model, "--data", str(tmp_path / "absent.npz")],
        "NaN pixels": ["scan", model, "--data", bad_data(tmp_path, "nan.npz", nan, y)],
        "wrong shape": ["scan", model, "--data", bad_data(tmp_path, "rgb.npz", np.repeat(x, 3, axis=1), y)],
        "labels beyond the model": ["scan", model, "--data", bad_data(tmp_path, "labels.npz", x, y + 5)],
        "too few per class": ["scan", model, "--data", bad_data(tmp_path, "few.npz", x[:20], y[:20])],
    }
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(Path(model).read_bytes()[:300])
    cases["truncated model"] = ["scan", str(truncated), "--data", str(out / "clean_samples.npz")]
    for case, args in cases.items():
        done = run_cli(*args, "--json", str(tmp_path / "error.json"))
        assert done.returncode == 2, (case, done.stdout, done.stderr)
        assert one_line(done.stderr).startswith("trojanscan: error:"), case
        assert json.loads((tmp_path / "error.json").read_text())["verdict"] == "error", case


def test_unsupported_file_and_usage_errors(smoke, tmp_path):
    out, _, _ = smoke
    junk = tmp_path / "notes.txt"
    junk.write_text("just some text, not a model")
    done = run_cli("scan", str(junk), "--data", str(out / "clean_samples.npz"))
    assert done.returncode == 3 and one_line(done.stderr)
    done = run_cli("scan", str(junk), "--detectors", "nc,nonsense")
    assert done.returncode == 4 and "usage" in one_line(done.stderr)
    done = run_cli("scan", str(junk), "--precision", "fp16")
    assert done.returncode == 4 and "--precision" in one_line(done.stderr)
    done = run_cli("scan", str(junk), "--no-such-flag")
    assert done.returncode == 4 and "usage" in one_line(done.stderr)
