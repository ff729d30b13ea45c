"""MAD outlier detection across classes (Leys et al. 2013), as Neural Cleanse, TABOR and
NeuronInspect use it."""

from __future__ import annotations

from typing import Literal

import numpy as np

CONSISTENCY = 1.4826  # makes MAD a consistent estimator of the standard deviation for normal data
Tail = Literal["low", "high"]


def median_absolute_deviation(values: np.ndarray) -> float:
    """median(|v - median(v)|), unscaled: the quantity `min_mad` floors (numpy's median, see
    `mad_anomaly_index`)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(np.abs(values - np.median(values))))


def mad_anomaly_index(values: np.ndarray, tail: Tail, min_mad: float = 0.0) -> np.ndarray:
    """Anomaly index per class: |v - median| / (1.4826 * median(|v - median|)), kept only on the
    suspicious tail (`low`: values below the median, e.g. small trigger norms; `high`: above).
    Classes on the other side of the median get index 0.

    `min_mad` (default 0: Leys et al. as stated) is a floor on median(|v - median|), for a
    statistic whose run-to-run noise is known: when most classes score nearly alike, the MAD
    of ten values can fall below that noise, and then a deviation the noise alone explains reads
    as an outlier (TABOR's `metric_mad_floor` says where this happened).

    numpy's median (mean of the two middle values on an even count) is used on purpose:
    torch.median takes the lower middle and changes which of 10 classes get flagged.
    A zero MAD (all values equal, or more than half of them identical) makes every deviating
    value infinitely anomalous; we return +inf for those and 0 for the rest.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 3:
        raise ValueError(f"MAD needs a 1-D array of at least 3 classes, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("MAD input contains NaN or inf")
    median = np.median(values)
    deviation = np.abs(values - median)
    mad = CONSISTENCY * max(median_absolute_deviation(values), min_mad)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.where(deviation > 0, deviation / mad if mad > 0 else np.inf, 0.0)
    on_tail = values < median if tail == "low" else values > median
    return np.where(on_tail, index, 0.0)


def flag(anomaly_index: np.ndarray, threshold: float) -> list[int]:
    """Classes whose anomaly index is at or above the threshold (product.md: default 2)."""
    return [int(k) for k in np.flatnonzero(np.asarray(anomaly_index) >= threshold)]
