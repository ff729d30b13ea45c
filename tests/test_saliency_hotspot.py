"""The saliency-hotspot detector: its steps on hand-checked inputs, then on the smoke trojan."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from scanner.detectors import DETECTORS
from scanner.detectors.saliency_hotspot import (
    SaliencyHotspot,
    SaliencyHotspotSettings,
    box_mean,
    hotspot_scores,
    persistent_maps,
)
from scanner.errors import TrojanScanError
from scanner.scan import ScanSettings, run_detectors


def test_box_mean_by_hand() -> None:
    one = torch.zeros(4, 4, dtype=torch.float64)
    one[0, 0] = 9.0
    out = box_mean(one, 3)
    # the 3x3 mean around each pixel, zero outside: the pixel reaches its 2x2 corner only
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[:2, :2] = 1.0
    assert torch.allclose(out, expected)
    assert torch.equal(box_mean(one, 1), one)
    assert box_mean(torch.ones(2, 5, 5), 3)[1, 2, 2] == pytest.approx(1.0)


def test_hotspot_scores_by_hand() -> None:
    # classes 0-3 spread evenly over a 4x4 image; class 4 puts half of its mass on one pixel
    maps = torch.ones(5, 4, 4, dtype=torch.float64)
    maps[4] = 0.5 / 15
    maps[4, 2, 1] = 0.5
    scores, ratio = hotspot_scores(maps, window=1, floor=1e-9)
    # share of an even class is 1/16 everywhere; the per-pixel median is 1/16 too
    assert torch.allclose(scores[:4], torch.ones(4, dtype=torch.float64))
    assert scores[4].item() == pytest.approx(0.5 * 16, rel=1e-6)
    assert ratio.shape == (5, 4, 4) and int(ratio[4].argmax()) == 2 * 4 + 1
    # scaling one class's map changes nothing: shares are scale-free
    scaled = maps.clone()
    scaled[4] *= 1000
    assert torch.allclose(hotspot_scores(scaled, 1, 1e-9)[0], scores)


class SquareLogits(nn.Module):
    """logit_c = sum(x^2) / 2 for every class: d logit / d x = x, whatever the class."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(dim=(1, 2, 3)).div(2).unsqueeze(1).repeat(1, self.classes)


def test_persistent_maps_leave_out_each_class_own_images() -> None:
    x = torch.zeros(4, 1, 3, 3)
    x[:2, 0, 0, 0] = 1.0  # class 0 images light up the top-left pixel
    x[2:, 0, 2, 2] = 1.0  # class 1 images the bottom-right one
    y = torch.tensor([0, 0, 1, 1])
    maps = persistent_maps(SquareLogits(2), x, y, 2, batch_size=3)
    assert maps[0, 2, 2] == 1.0 and maps[0, 0, 0] == 0.0  # class 0 is explained on class 1's images
    assert maps[1, 0, 0] == 1.0 and maps[1, 2, 2] == 0.0
    with pytest.raises(TrojanScanError, match="other than 0"):
        persistent_maps(SquareLogits(2), x[:2], y[:2], 2, batch_size=8)


def test_default_threshold_is_its_own_unless_the_scan_sets_one() -> None:
    assert SaliencyHotspotSettings().threshold == 3.0 and DETECTORS["hotspot"] is SaliencyHotspot
    assert "threshold_applies_to_all" not in ScanSettings().model_dump()
    assert ScanSettings(threshold=2.0).model_dump()["threshold_applies_to_all"] is True


def test_flags_the_square_trojan_and_points_at_the_trigger(smoke_models) -> None:
    out_dir, models, data, load = smoke_models
    result = SaliencyHotspot(seed=0).scan(load("fm-square4-br"), data, 10)
    assert 7 in result.flagged_classes, result.anomaly_index
    assert int(np.argmax(result.anomaly_index)) == 7 and result.anomaly_index[7] >= 3
    # the hotspot of the target class is inside the planted 4x4 trigger
    mask = np.load(out_dir / models["fm-square4-br"]["ground_truth"][0]["mask"])
    row, col = result.notes["hotspot_pixel"][7]
    assert mask[row, col] == 1.0
    assert result.to_json()["statistics"]["hotspot_ratio"][7] == max(result.to_json()["statistics"]["hotspot_ratio"])


def test_scan_threshold_reaches_the_detector_only_when_set(smoke_models) -> None:
    _, _, data, load = smoke_models
    model = load("fm-square4-br")
    own = run_detectors(model, data, 10, ScanSettings(detectors=("hotspot",)), torch.device("cpu"))["hotspot"]
    assert own.settings["threshold"] == 3.0
    strict = run_detectors(model, data, 10, ScanSettings(detectors=("hotspot",), threshold=100.0),
                           torch.device("cpu"))["hotspot"]
    assert strict.settings["threshold"] == 100.0 and strict.flagged_classes == []
    assert np.array_equal(strict.anomaly_index, own.anomaly_index)


def test_cli_scan_with_hotspot(smoke_models, tmp_path) -> None:
    out_dir, models, _, _ = smoke_models
    model = out_dir / models["fm-square4-br"]["files"]["onnx"]["path"]
    done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", str(model), "--data",
                           str(out_dir / "clean_samples.npz"), "--detectors", "hotspot", "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert 7 in result["detectors"]["hotspot"]["flagged_classes"]
    assert len(result["detectors"]["hotspot"]["anomaly_index"]) == 10
