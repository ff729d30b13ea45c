"""NeuronInspect: features on hand-built maps, rectified saliency on hand-set networks (as
nn.Module and as torch.export GraphModule), weighting and low-tail MAD, and end to end on the
Fashion-MNIST smoke zoo (one clean model, one with a 4x4 white square bottom-right -> 7)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from scanner.anomaly import mad_anomaly_index
from scanner.data import CleanData
from scanner.detectors.base import DETECTORS
from scanner.detectors.neuron_inspect import (
    NeuronInspect,
    NeuronInspectSettings,
    choose_images,
    class_saliency_maps,
    combined_feature,
    normalise_maps,
    persistence_feature,
    rectified_saliency,
    smoothness_feature,
    sparseness_feature,
    threshold_maps,
)
from scanner.errors import TrojanScanError
from scanner.models import build_model


def block(size: int, row: int, col: int, side: int = 2) -> torch.Tensor:
    out = torch.zeros(size, size, dtype=torch.float64)
    out[row:row + side, col:col + side] = 1.0
    return out


# ------------------------------------------------------------------------ features by hand

def test_sparseness_of_a_block_is_its_area() -> None:
    assert sparseness_feature(block(6, 2, 2)).item() == 4.0
    assert sparseness_feature(torch.stack([block(6, 2, 2), 0.5 * block(6, 0, 0, 3)])).tolist() == [4.0, 4.5]


def test_smoothness_of_a_block_by_hand() -> None:
    # Interior 2x2 block: each block pixel has 2 neighbours in the block, 1+1-4 = -2 (4 x 2 = 8);
    # the 8 pixels beside the block edges see one block neighbour each: +1 (8). Total 16.
    assert smoothness_feature(block(6, 2, 2)).item() == 16.0
    # In the top-left corner, zero padding: block pixels still -2 (8), only 4 pixels beside it: 12.
    assert smoothness_feature(block(6, 0, 0)).item() == 12.0
    # A constant map: 0 inside; with zero padding an edge pixel misses 1 neighbour (-1, 8 of
    # them on a 4x4 map) and a corner misses 2 (-2, 4 corners): 8 + 8 = 16.
    assert smoothness_feature(torch.ones(4, 4, dtype=torch.float64)).item() == 16.0
    assert smoothness_feature(torch.zeros(3, 5, 5)).tolist() == [0.0, 0.0, 0.0]


def test_smoothness_and_threshold_match_the_convolution_and_numpys_quantile() -> None:
    import numpy as np
    import torch.nn.functional as F

    from scanner.detectors.neuron_inspect import LAPLACIAN

    maps = torch.rand(3, 7, 11, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = torch.tensor(LAPLACIAN, dtype=maps.dtype).view(1, 1, 3, 3)
    convolved = F.conv2d(maps.reshape(-1, 1, 11, 13), kernel, padding=1).abs().sum(dim=(-3, -2, -1)).reshape(3, 7)
    assert torch.allclose(smoothness_feature(maps), convolved)
    for quantile in (0.0, 0.5, 0.9, 0.98, 1.0):
        level = np.quantile(maps.numpy().reshape(3, 7, -1), quantile, axis=-1)[..., None, None]
        assert torch.equal(threshold_maps(maps, quantile), torch.from_numpy(maps.numpy() > level))


def test_threshold_at_each_maps_own_median() -> None:
    ramp = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    on = threshold_maps(torch.stack([ramp, 10 * ramp]))  # median 17.5 and 175: the upper 18 pixels
    assert on.shape == (2, 6, 6) and on.dtype == torch.bool
    assert on.sum(dim=(1, 2)).tolist() == [18, 18]
    assert on[0].flatten()[18:].all() and not on[0].flatten()[:18].any()
    # A map that is mostly zero has median 0: its support is on.
    assert threshold_maps(block(6, 2, 2)).sum().item() == 4
    assert threshold_maps(ramp, quantile=0.9).sum().item() == 4  # above 31.5: 32..35


def test_persistence_identical_disjoint_and_three_maps() -> None:
    a, b = block(6, 0, 0), block(6, 3, 3)
    assert persistence_feature(torch.stack([a, a, a, a])).item() == 0.0
    assert persistence_feature(torch.stack([a, b])).item() == 8.0  # 4 + 4 pixels differ
    # k = 3 maps (a, a, b): pairs (a,a)=0, (a,b)=8, (a,b)=8 -> mean 16/3. The chained XOR of the
    # paper would give ||a xor a xor b|| = 4 (a parity), which is why we read it pairwise.
    assert math.isclose(persistence_feature(torch.stack([a, a, b])).item(), 16 / 3)
    # Per class: (classes, k, H, W) -> (classes,)
    assert persistence_feature(torch.stack([torch.stack([a, a]), torch.stack([a, b])])).tolist() == [0.0, 8.0]
    with pytest.raises(ValueError):
        persistence_feature(a[None])


def test_normalise_maps_per_map_max() -> None:
    maps = torch.stack([block(4, 0, 0) * 5, torch.zeros(4, 4, dtype=torch.float64), block(4, 1, 1) * 0.25])
    out = normalise_maps(maps)
    assert out.amax(dim=(1, 2)).tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(normalise_maps(maps * 1000), out)


def test_combined_feature_weighting_and_low_tail_mad() -> None:
    sparse = np.array([40.0, 50, 60, 45, 55, 50, 48, 52, 10, 50])
    smooth = np.array([150.0, 160, 150, 155, 160, 150, 158, 152, 150, 155])
    persistent = np.array([300.0, 300, 310, 305, 300, 310, 300, 305, 330, 300])
    mnist = combined_feature(sparse, smooth, persistent, 0.1, 1, 1)
    assert mnist[0] == 4 + 150 + 300 and mnist[8] == 1 + 150 + 330
    gtsrb = combined_feature(sparse, smooth, persistent, 1, 1, 10)
    assert gtsrb[8] == 10 + 150 + 3300
    only_sparse = combined_feature(sparse, smooth, persistent, 1, 0, 0)
    assert np.array_equal(only_sparse, sparse)
    # Class 8 is the low outlier on sparseness alone: median 50; deviations sorted
    # 0 0 0 2 2 5 5 10 10 40, median (2 + 5) / 2 = 3.5 (numpy's mean of the two middle values),
    # MAD = 1.4826 * 3.5, index (50 - 10) / MAD = 7.708.
    index = mad_anomaly_index(only_sparse, tail="low")
    assert math.isclose(index[8], 40 / (1.4826 * 3.5))
    assert math.isclose(index[0], 10 / (1.4826 * 3.5))
    assert index[2] == 0.0 and index[4] == 0.0  # above the median: not on the low tail
    # With GTSRB weights its high persistence hides it: it is the largest combined value.
    assert mad_anomaly_index(gtsrb, tail="low")[8] == 0.0


def test_choose_images_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 50)
    chosen = choose_images(labels, 100, seed=3)
    assert len(set(chosen.tolist())) == 100
    assert np.bincount(labels[chosen], minlength=10).tolist() == [10] * 10
    assert np.array_equal(chosen, choose_images(labels, 100, seed=3))
    assert not np.array_equal(chosen, choose_images(labels, 100, seed=4))
    assert np.array_equal(choose_images(labels[:30], 100, seed=0), np.arange(30))


def test_settings_bounds_and_defaults() -> None:
    settings = NeuronInspectSettings()
    assert (settings.lambda_sp, settings.lambda_sm, settings.lambda_pe) == (0.1, 1.0, 1.0)
    assert NeuronInspectSettings(lambda_sp=1, lambda_pe=10).lambda_pe == 10
    for bad in ({"images": 1}, {"lambda_pe": -1}, {"persistence_quantile": 1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            NeuronInspectSettings(**bad)
    assert all(field.description for field in NeuronInspectSettings.model_fields.values())
    assert DETECTORS["ni"] is NeuronInspect


# ------------------------------------------------------------------------ rectified saliency

def hand_net() -> nn.Module:
    """(1, 1, 1, 2) image -> 3 hidden ReLU units -> 2 logits, weights set by hand."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 1.0], [-1.0, -1.0]]))
        net[1].bias.zero_()
        net[3].weight.copy_(torch.tensor([[1.0, -1.0, 5.0], [0.5, 0.5, 0.0]]))
        net[3].bias.zero_()
    return net.eval()


def plain_gradient(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def test_rectified_saliency_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0]]]])
    net = hand_net()
    # Pre-activations (5, 4, -3): units 1 and 2 active, unit 3 off.
    # Plain gradient of logit 0: 1 * (1, 2) - 1 * (2, 1) = (-1, 1); its positive part is (0, 1).
    assert plain_gradient(net, x, 0).flatten().tolist() == [-1.0, 1.0]
    # Rectified: the negative gradient -1 into unit 2 is clipped, unit 3's +5 is blocked by its
    # inactive input: 1 * (1, 2) = (1, 2).
    saliency = rectified_saliency(net, x, 0)
    assert saliency.shape == (1, 1, 2)
    assert saliency.flatten().tolist() == [1.0, 2.0]
    # Logit 1 has no negative gradients: rectified == plain = 0.5 * (1, 2) + 0.5 * (2, 1).
    assert rectified_saliency(net, x, 1).flatten().tolist() == [1.5, 1.5]
    assert plain_gradient(net, x, 1).flatten().tolist() == [1.5, 1.5]


def test_rectified_saliency_same_from_exported_graph_module() -> None:
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])
    net = hand_net()
    exported = torch.export.export(net, (x,)).module()
    for target in (0, 1):
        assert torch.equal(rectified_saliency(exported, x, target), rectified_saliency(net, x, target))
    assert rectified_saliency(exported, x, 0)[0].flatten().tolist() == [1.0, 2.0]


def test_rectified_saliency_cnn_module_export_and_inplace_agree() -> None:
    torch.manual_seed(0)
    model = build_model("nc_mnist", 1, 10, 28).eval()
    x = torch.rand(4, 1, 28, 28)
    exported = torch.export.export(model, (x,)).module()
    inplace = build_model("nc_mnist", 1, 10, 28)
    inplace.load_state_dict(model.state_dict())
    for module in inplace.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    inplace.eval()
    reference = rectified_saliency(model, x, 3)
    assert torch.allclose(rectified_saliency(exported, x, 3), reference, atol=1e-6)
    assert torch.allclose(rectified_saliency(inplace, x, 3), reference, atol=1e-6)
    plain = plain_gradient(model, x, 3).clamp_min(0)[:, 0]
    assert not torch.allclose(plain, reference, atol=1e-4)  # negative gradients exist and are cut


def test_class_saliency_maps_batching_and_colour_channels() -> None:
    torch.manual_seed(1)
    model = build_model("gtsrb_cnn", 3, 5, 16).eval()
    x = torch.rand(9, 3, 16, 16)
    whole = class_saliency_maps(model, x, 5, batch_size=128)
    chunked = class_saliency_maps(model, x, 5, batch_size=4)
    assert whole.shape == (5, 9, 16, 16) and (whole >= 0).all()
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(whole[2], rectified_saliency(model, x, 2), atol=1e-6)


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def test_scan_is_invariant_to_the_logit_scale_and_fast() -> None:
    torch.manual_seed(2)
    model = build_model("nc_mnist", 1, 10, 28).eval()
    rng = np.random.default_rng(0)
    data = CleanData(rng.random((100, 1, 28, 28), dtype=np.float32), np.repeat(np.arange(10), 10))
    calls: list[tuple[str, int, int]] = []
    started = time.perf_counter()
    result = NeuronInspect(seed=0, progress=lambda *a: calls.append(a)).scan(model, data, 10)
    assert time.perf_counter() - started < 5.0  # about 0.2 s on one idle core
    assert calls == [("ni", done, 10) for done in range(1, 11)]
    scaled = NeuronInspect(seed=0).scan(Scaled(model, 37.0), data, 10)
    for name in ("sparse", "smooth", "persistent", "combined"):
        assert np.allclose(scaled.statistics[name], result.statistics[name], rtol=1e-5), name
    assert np.allclose(scaled.anomaly_index, result.anomaly_index, rtol=1e-4, atol=1e-6)


def test_non_finite_saliency_is_an_error() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :10] * float("nan")

    data = CleanData(np.full((20, 1, 4, 4), 0.5, np.float32), np.repeat(np.arange(10), 2))
    with pytest.raises(TrojanScanError, match="NaN or inf"):
        NeuronInspect().scan(Broken(), data, 10)


# ------------------------------------------------------------------------ end to end

def test_flags_the_square_trojan_target(smoke_models) -> None:
    out_dir, models, data, load = smoke_models
    result = NeuronInspect(seed=0).scan(load("fm-square4-br"), data, 10)
    assert result.anomaly_index[7] >= 2.0, result.anomaly_index
    assert int(np.argmin(result.statistics["combined"])) == 7
    assert 7 in result.flagged_classes
    assert set(result.statistics) == {"sparse", "smooth", "persistent", "combined"}
    assert sorted(result.heatmaps) == list(range(10))
    heatmap = result.heatmaps[7]
    assert heatmap.shape == (28, 28) and heatmap.dtype == np.float32
    # The target's mean saliency peaks inside the planted trigger.
    mask = np.load(out_dir / models["fm-square4-br"]["ground_truth"][0]["mask"])
    assert mask[np.unravel_index(heatmap.argmax(), heatmap.shape)] == 1.0
    assert result.settings["images"] == 100 and result.seed == 0
    assert result.to_json()["flagged_classes"] == result.flagged_classes


def test_same_seed_gives_the_same_indices(smoke_models) -> None:
    # NeuronInspect's false alarms on clean models (3 of 9 clean smoke models flagged) are a
    # missed target reported on issue 4, not asserted away here.
    _, _, data, load = smoke_models
    model = load("fm-clean-s0")
    result = NeuronInspect(seed=0).scan(model, data, 10)
    again = NeuronInspect(seed=0).scan(model, data, 10)
    assert np.array_equal(again.anomaly_index, result.anomaly_index)
    other = NeuronInspect(NeuronInspectSettings(images=50), seed=1).scan(model, data, 10)
    assert not np.array_equal(other.statistics["combined"], result.statistics["combined"])
