"""How well a scan did against ground truth: mask F1 of restored triggers and the TABOR paper's
correctness symbols (Table I); and how sure a measured drop in clean accuracy is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Correctness = Literal["success", "success_extra", "wrong_class", "failure", "clean_pass", "false_alarm"]
MASK_THRESHOLD = 0.5  # a restored mask pixel counts as trigger when its value is at least this


def f1_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 of two boolean masks of the same shape (0 when both are empty)."""
    tp = float(np.logical_and(predicted, truth).sum())
    denominator = float(predicted.sum() + truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def mask_f1(restored: np.ndarray, truth: np.ndarray, threshold: float = MASK_THRESHOLD) -> float:
    """F1 between a restored mask (H, W) binarised at `threshold` and the ground-truth mask.

    A truth smaller than the image is a random-position trigger's patch: it is slid over every
    position and the best F1 counts (the trigger may appear anywhere, so any place is right).
    """
    predicted = np.asarray(restored) >= threshold
    truth = np.asarray(truth) > 0
    if truth.shape == predicted.shape:
        return f1_score(predicted, truth)
    h, w = truth.shape
    windows = sliding_window_view(predicted, (h, w))  # (H-h+1, W-w+1, h, w)
    tp = np.logical_and(windows, truth).sum(axis=(2, 3))
    total = predicted.sum()  # false positives count everywhere in the image, not only in the window
    f1 = 2 * tp / np.maximum(total + truth.sum(), 1)
    return float(f1.max())


def paper_mask_f1(restored: np.ndarray, truth: np.ndarray) -> float:
    """TABOR's fidelity F1 (section V-B) on the restored mask as it is, not binarised:
    precision = ||M * M_t||_1 / ||M||_1, recall = ||M * M_t||_1 / ||M_t||_1,
    F1 = 2 * precision * recall / (precision + recall), with M the restored mask in [0, 1] and M_t
    the ground-truth mask (any value > 0 counts as 1). A truth smaller than the image is slid over
    every position, as in `mask_f1`. 0 when either mask is empty or nothing overlaps."""
    restored = np.asarray(restored, dtype=np.float64)
    truth = (np.asarray(truth) > 0).astype(np.float64)
    total, area = restored.sum(), truth.sum()
    if total <= 0 or area <= 0:
        return 0.0
    if truth.shape == restored.shape:
        overlap = np.array([(restored * truth).sum()])
    else:
        windows = sliding_window_view(restored, truth.shape)
        overlap = (windows * truth).sum(axis=(2, 3)).ravel()
    precision, recall = overlap / total, overlap / area
    f1 = np.where(overlap > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(f1.max())


def correctness(flagged: list[int], targets: list[int], trojaned: bool) -> Correctness:
    """TABOR Table I's symbols: every target flagged and nothing else (success), every target plus
    extra classes (success_extra), something flagged but a target missed (wrong_class), nothing
    flagged on a trojan (failure); on a clean model: clean_pass or false_alarm."""
    flagged_set = set(flagged)
    if not trojaned:
        return "false_alarm" if flagged_set else "clean_pass"
    if set(targets) <= flagged_set:
        return "success" if flagged_set == set(targets) else "success_extra"
    return "wrong_class" if flagged_set else "failure"


@dataclass(frozen=True)
class AccuracyDrop:
    """Clean accuracy lost between two models measured on the same images, with a one-sided upper
    confidence bound (positive = accuracy lost)."""

    images: int
    worse: int  # right before, wrong after
    better: int  # wrong before, right after
    drop: float  # (worse - better) / images
    upper_bound: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_accuracy_drop(correct_before: np.ndarray, correct_after: np.ndarray, confidence: float) -> AccuracyDrop:
    """The accuracy drop of two models on the same images and its one-sided `confidence` upper bound.

    The two accuracies are paired (same images), so only the discordant images carry the
    difference: d = (worse - better) / n. The bound is the Agresti-Min interval for matched
    proportions (Statistics in Medicine 24, 2005): add 1/2 to each of the four cells of the 2x2
    table (so n + 2 images), then d' + z * sqrt(((worse' + better') - (worse' - better')^2 / (n + 2)))
    / (n + 2), z the normal quantile at `confidence`. Chosen over the plain Wald bound, which
    claims certainty when no image changed (zero variance) however few images were measured."""
    before, after = np.asarray(correct_before, dtype=bool), np.asarray(correct_after, dtype=bool)
    if before.shape != after.shape or before.ndim != 1 or not len(before):
        raise ValueError("paired accuracy needs two equally long, non-empty vectors of per-image correctness")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    n = len(before)
    worse, better = int((before & ~after).sum()), int((~before & after).sum())
    w, b, total = worse + 0.5, better + 0.5, n + 2
    variance = max((w + b) - (w - b) ** 2 / total, 0.0) / total**2
    bound = (w - b) / total + NormalDist().inv_cdf(confidence) * variance**0.5
    return AccuracyDrop(images=n, worse=worse, better=better, drop=(worse - better) / n,
                        upper_bound=float(bound), confidence=confidence)
