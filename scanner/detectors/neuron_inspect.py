"""NeuronInspect (Huang et al. 2019): trojan targets have sparse, smooth, persistent saliency.

For every class, NeuronInspect computes a *rectified saliency* map of its logit on k clean images
(no trigger is ever stamped: the public port does that, which is an oracle), extracts three
features per class and flags classes whose combined feature is an outlier on the LOW tail.

Choices the paper leaves open, made here and recorded in the result JSON:

- Channel reduction: a map is the sum over colour channels of the positive part of the rectified
  input gradient (only pixels whose increase raises the logit count, as the paper's "only
  positive contributions" asks). The maps are non-negative.
- Normalisation: every map (one class, one image) is divided by its own maximum, so its hottest
  pixel is 1 and the features count pixels at full intensity: the weights then mean the same
  across models, and multiplying the logits by a constant changes nothing. We measured the
  alternatives that keep the classes' relative strength (each image's maps divided by their
  common max, or all maps by one model-wide scale): they hide the trojan, because the target's
  map is concentrated but strong, so its L1 is not small until each map is put on its own scale.
- Persistence: the paper chains XOR over k maps, which is a parity for k > 2. We read it as the
  mean Hamming distance (L1 of the XOR) over all k(k-1)/2 pairs of thresholded maps, which is
  independent of the image order. A pixel is on when it exceeds its own map's quantile
  `persistence_quantile` (0.5: the median, as the public port thresholds).
- Smoothness: the Laplacian is applied with zero padding (no saliency outside the image).
- Sparse and smooth are averaged over the k images; all three features are per class.
- Weights: the paper's MNIST weights (0.1, 1, 1) by default; GTSRB's (1, 1, 10) by override.

Measured on Fashion-MNIST smoke models (nc_mnist, 2 epochs, k = 100, about 0.2 s a scan on one
core): 4x4 square trojans are found every time (7 of 7, target index 3.1-6.1, always the top
class), but 3 of 9 clean models get a class at index >= 2 (2.4, 2.7, 5.1): guided saliency is
nearly the same for every class, so the MAD of the features is small and one class that is a
little more concentrated stands out. With GTSRB weights and the median threshold the
persistence term dominates and the trojan is missed.

On the full zoos it finds almost nothing: `benchmarks/ni_variants.py` scores this detector and
the alternatives the paper leaves open (plain gradients, persistence thresholds 0.9 and 0.98,
either weight row) from one saliency pass. As shipped it catches 1 of the 20 Fashion-MNIST and 0
of the 13 signs trojans; no variant catches more than 6/20 (with 2 of 5 clean models flagged)
and 1/13. Nor does the other reading of "the heatmap" of a class (sparse and smooth on the mean
of its k maps, not averaged over them): 4/20 on the Fashion-MNIST build of 2026-12-05, 6/20 by
its sparseness alone, against 1/20 as shipped (`benchmarks/results/ni_variants_fm.md`). The
trigger is in the saliency (the target class puts the largest share of its saliency on the
trigger's pixels for nearly every fixed-position trojan), but the whole-map features cannot see
it; `saliency_hotspot.py` compares classes pixel by pixel instead. Nor is it
the zoo's training: `benchmarks/ni_training_regime.py` retrains four of its trojans as the paper
trained MNIST (Adam lr 0.01, 10 epochs, inject ratio 0.01) and this detector catches none of them
(target index 0.00-0.21) while flagging classes 5, 7 or 9 on 5 of the 6 models, a clean one too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.overrides import TorchFunctionMode

from scanner.anomaly import flag, mad_anomaly_index
from scanner.data import CleanData
from scanner.detectors.base import DetectionResult, Detector, DetectorSettings, register
from scanner.errors import TrojanScanError

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
PAPER_WEIGHTS = {"mnist": (0.1, 1.0, 1.0), "gtsrb": (1.0, 1.0, 10.0)}  # (sp, sm, pe), Table 6


class NeuronInspectSettings(DetectorSettings):
    """NeuronInspect's settings; the weights default to the paper's MNIST row of Table 6."""

    images: int = Field(100, ge=2, le=100_000,
                        description="clean images k the maps are computed on, seeded and balanced over classes")
    lambda_sp: float = Field(PAPER_WEIGHTS["mnist"][0], ge=0, le=1e6,
                             description="weight of the sparseness feature (paper: 0.1 MNIST, 1 GTSRB)")
    lambda_sm: float = Field(PAPER_WEIGHTS["mnist"][1], ge=0, le=1e6,
                             description="weight of the smoothness feature (paper: 1 MNIST, 1 GTSRB)")
    lambda_pe: float = Field(PAPER_WEIGHTS["mnist"][2], ge=0, le=1e6,
                             description="weight of the persistence feature (paper: 1 MNIST, 10 GTSRB)")
    persistence_quantile: float = Field(0.5, ge=0, lt=1,
                                        description="a saliency pixel is 'on' when it exceeds this quantile "
                                        "of its own map (0.5 = median, as the public port)")
    batch_size: int = Field(128, ge=1, le=65_536, description="images per forward/backward pass")


# ------------------------------------------- rectified saliency (paper: "Saliency Map Generation")

class _RectifiedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients: grad_in = relu(grad_out) * (x > 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        active = x > 0
        ctx.save_for_backward(active)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        (active,) = ctx.saved_tensors
        return grad_out.clamp_min(0) * active


_OUT_OF_PLACE_RELU = {F.relu, torch.relu, torch.Tensor.relu, torch.ops.aten.relu.default}
_IN_PLACE_RELU = {F.relu_, torch.relu_, torch.Tensor.relu_, torch.ops.aten.relu_.default}


class _RectifiedReLUMode(TorchFunctionMode):
    """Replaces every ReLU the model calls (nn.ReLU, F.relu, torch.relu, aten.relu in a
    torch.export / onnx2torch GraphModule) by `_RectifiedReLU`. In-place ReLUs copy the rectified
    result back into their input, so callers that ignore the return value still see it."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE_RELU or func in _IN_PLACE_RELU:
            x = args[0] if args else kwargs["input"]
            flag_given = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            inplace = func in _IN_PLACE_RELU or bool(flag_given)
            out = _RectifiedReLU.apply(x)
            return x.copy_(out) if inplace else out
        return func(*args, **kwargs)


def _reduce_channels(grad: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) input gradients -> (N, H, W): sum over channels of the positive parts."""
    return grad.clamp_min(0).sum(dim=1)


def input_saliency(model: torch.nn.Module, x: torch.Tensor, classes: Sequence[int], *, rectified: bool = True,
                   on_class: Callable[[int], None] | None = None) -> torch.Tensor:
    """One forward pass, then one backward pass per class: (len(classes), N, H, W), each map the
    sum over channels of the positive part of d logit / d x. `rectified` makes every ReLU pass only
    positive gradients back (NeuronInspect's rectified saliency); without it the gradient is plain."""
    x = x.detach().clone().requires_grad_(True)
    if rectified:
        with _RectifiedReLUMode():
            logits = model(x)
    else:
        logits = model(x)
    if logits.ndim != 2:
        raise TrojanScanError(
            f"saliency needs (N, classes) logits, the model returned shape {tuple(logits.shape)}")
    outside = [c for c in classes if not 0 <= c < logits.shape[1]]
    if outside:
        raise TrojanScanError(f"class {outside[0]} is out of range for a model with {logits.shape[1]} outputs")
    maps = []
    for position, target in enumerate(classes):
        # Images are independent (eval mode), so the gradient of the summed logit is per image.
        (grad,) = torch.autograd.grad(logits[:, target].sum(), x, retain_graph=position < len(classes) - 1)
        maps.append(_reduce_channels(grad))
        if on_class is not None:
            on_class(position)
    return torch.stack(maps)


def rectified_saliency(model: torch.nn.Module, x: torch.Tensor, target_class: int) -> torch.Tensor:
    """Rectified saliency (paper, "Saliency Map Generation"): d logit_y / d x on the
    unnormalised logit (no softmax), where the backward pass propagates only positive gradients
    through every ReLU (guided backpropagation: grad_in = relu(grad_out) * (x > 0)).

    Channels are reduced to one map per image by summing their positive parts: (N, H, W) >= 0.
    """
    return input_saliency(model, x, [target_class])[0]


def class_saliency_maps(model: torch.nn.Module, x: torch.Tensor, num_classes: int, batch_size: int,
                        progress: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
    """Rectified saliency of every class on images x: (classes, N, H, W), raw (not normalised).

    With all images in one batch the forward pass is done once and shared by the classes'
    backward passes; otherwise each class runs forward and backward batch by batch.
    """
    classes = list(range(num_classes))
    if len(x) <= batch_size:
        return input_saliency(model, x, classes, on_class=lambda i: progress(i + 1, num_classes))
    maps = []
    for target in classes:
        maps.append(torch.cat([input_saliency(model, x[i:i + batch_size], [target])[0]
                               for i in range(0, len(x), batch_size)]))
        progress(target + 1, num_classes)
    return torch.stack(maps)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Divide every map (..., H, W) by its own maximum, so its hottest pixel is 1; an all-zero map
    stays zero. Scale-invariant: maps of logits multiplied by c > 0 normalise to the same maps."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


# ------------------------------------------- features (paper: "Features Extraction")

def sparseness_feature(maps: torch.Tensor) -> torch.Tensor:
    """Sparseness (paper: "Sparseness"): f_sparse(M) = ||M||_1 = sum_ij |M_ij|.

    Per map: (..., H, W) -> (...)."""
    return maps.abs().sum(dim=(-2, -1))


def smoothness_feature(maps: torch.Tensor) -> torch.Tensor:
    """Smoothness (paper: "Smoothness"): f_smooth(M) = ||laplacian(M)||_1 = ||M (x) f_s||_1, the
    L1 of the map convolved with f_s = [[0,1,0],[1,-4,1],[0,1,0]] (LAPLACIAN).

    Zero padding (the map is taken as zero outside the image). The convolution is written as the
    sum of the four shifted maps minus four times the map: the same numbers as F.conv2d with
    LAPLACIAN, 7x faster on thousands of one-channel maps on a CPU. Per map: (..., H, W) -> (...)."""
    padded = F.pad(maps, (1, 1, 1, 1))
    response = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
                - 4.0 * maps)
    return response.abs().sum(dim=(-2, -1))


def threshold_maps(maps: torch.Tensor, quantile: float = 0.5) -> torch.Tensor:
    """T(M): a boolean map, True where a pixel exceeds its own map's `quantile` (0.5: median),
    the quantile interpolated linearly as numpy's default between the two order statistics
    around it (found with kthvalue, not a full sort; torch.quantile caps its input size)."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    position = quantile * (flat.shape[-1] - 1)
    low = int(position)
    high = min(low + 1, flat.shape[-1] - 1)
    below = flat.kthvalue(low + 1, dim=-1, keepdim=True).values
    above = flat.kthvalue(high + 1, dim=-1, keepdim=True).values if high != low else below
    level = below + (position - low) * (above - below)
    return (flat > level).reshape(maps.shape)


def persistence_feature(maps: torch.Tensor, quantile: float = 0.5) -> torch.Tensor:
    """Persistence (paper: "Persistence"): f_persistent(M_1..M_k) = ||T(M_1) xor ... xor T(M_k)||_1,
    read as the mean over all k(k-1)/2 pairs (i, j) of ||T(M_i) xor T(M_j)||_1 (the chained XOR is a parity for
    k > 2). With p on-maps at a pixel, p(k-p) pairs differ there, so the mean is
    sum_px 2 p (k - p) / (k (k - 1)). maps: (..., k, H, W) -> (...)."""
    k = maps.shape[-3]
    if k < 2:
        raise ValueError(f"persistence needs at least 2 maps per class, got {k}")
    on = threshold_maps(maps, quantile).to(torch.float64).sum(dim=-3)
    return (2.0 * on * (k - on)).sum(dim=(-2, -1)) / (k * (k - 1))


def combined_feature(sparse: np.ndarray, smooth: np.ndarray, persistent: np.ndarray,
                     lambda_sp: float, lambda_sm: float, lambda_pe: float) -> np.ndarray:
    """Combined feature (paper: "Combined Feature"):
    f_combine = lambda_sp * f_sparse + lambda_sm * f_smooth + lambda_pe * f_persistent."""
    return lambda_sp * np.asarray(sparse) + lambda_sm * np.asarray(smooth) + lambda_pe * np.asarray(persistent)


def class_features(maps: torch.Tensor, weights: tuple[float, float, float], quantile: float) -> dict[str, np.ndarray]:
    """Per class, from its normalised maps (classes, k, H, W): sparse and smooth averaged over the
    k images, persistence over them, and their combination with weights (sp, sm, pe)."""
    sparse = sparseness_feature(maps).mean(dim=1).cpu().numpy()
    smooth = smoothness_feature(maps).mean(dim=1).cpu().numpy()
    persistent = persistence_feature(maps, quantile).cpu().numpy()
    return {"sparse": sparse, "smooth": smooth, "persistent": persistent,
            "combined": combined_feature(sparse, smooth, persistent, *weights)}


# ---------------------------------------------------------------- the detector

def choose_images(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices drawn from the seed, balanced over the classes present: a seeded
    permutation of each class, taken round-robin over classes. All indices if count >= N."""
    rng = np.random.default_rng(seed)
    if count >= len(labels):
        return np.arange(len(labels))
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    depth = max(len(q) for q in queues)
    order = [q[i] for i in range(depth) for q in queues if i < len(q)]
    return np.sort(np.asarray(order[:count]))


@register
class NeuronInspect(Detector):
    """Rectified saliency of every class on clean images; low-tail MAD on the combined feature."""

    name = "ni"
    settings_model = NeuronInspectSettings

    def scan(self, model: torch.nn.Module, data: CleanData, num_classes: int) -> DetectionResult:
        started = time.perf_counter()
        settings: NeuronInspectSettings = self.settings  # type: ignore[assignment]
        data.check_fits(num_classes)
        chosen = choose_images(data.y, settings.images, self.seed)
        if len(chosen) < 2:
            raise TrojanScanError("NeuronInspect needs at least 2 clean images")
        x = torch.from_numpy(data.x[chosen]).to(self.device)
        raw = class_saliency_maps(model, x, num_classes, settings.batch_size,
                                  progress=lambda done, total: self.progress(self.name, done, total))
        raw = raw.detach()
        if not torch.isfinite(raw).all():
            raise TrojanScanError("NeuronInspect: the rectified saliency contains NaN or inf; "
                                  "the model's gradients are not finite on the clean images")
        if not (raw > 0).any():
            raise TrojanScanError("NeuronInspect: the rectified saliency is zero for every class and image")
        maps = normalise_maps(raw).to(torch.float64)  # (classes, k, H, W)
        statistics = class_features(maps, (settings.lambda_sp, settings.lambda_sm, settings.lambda_pe),
                                    settings.persistence_quantile)
        index = mad_anomaly_index(statistics["combined"], tail="low")
        heatmaps = maps.mean(dim=1).to(torch.float32).cpu().numpy()
        return DetectionResult(
            detector=self.name,
            anomaly_index=index,
            flagged_classes=flag(index, settings.threshold),
            statistics=statistics,
            settings=settings.model_dump(mode="json"),
            seed=self.seed,
            seconds=time.perf_counter() - started,
            heatmaps={c: heatmaps[c] for c in range(num_classes)},
            notes={"images": int(len(chosen)), "all_zero_maps": int((raw.amax(dim=(2, 3)) == 0).sum()),
                   "normalisation": "each map divided by its own max",
                   "persistence": "mean pairwise XOR of maps thresholded at their own quantile",
                   "channel_reduction": "sum of positive parts"},
        )
