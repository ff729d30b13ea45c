"""The ranker -> TABOR cascade (`--mode fast`, issue 4 item 7).

The ranker is a cheap saliency detector: NeuronInspect, or the saliency hotspot detector when
`hotspot` is among the scan's detectors (it ranks the zoos' targets first far more often, see
`benchmarks/results/ni_variants.md`; `ranker` in the cascade settings picks one explicitly).
A ranker is cheap (one saliency pass per class, seconds on a small CNN); TABOR
is expensive (a trigger optimisation per class). The cascade runs the ranker on every class,
ranks the classes by its combined feature, and lets TABOR restore only the suspects. TABOR's
cost grows with the number of classes it restores, so the saving is roughly
classes / restored (less the ranker's time and TABOR's fixed costs).

Choices (recorded in the result JSON under `detectors.tabor.notes.cascade`):

- **Which classes TABOR restores**: the ranker's flagged classes together with its `top_k`
  (default 3) most suspicious classes, ranked by its statistic (NeuronInspect: the combined
  feature, low = suspicious; hotspot: the hotspot ratio, high = suspicious). The statistic is
  used rather than the anomaly index because the index is 0 for the whole other half of the
  classes, which gives no order there. Usually the ranker flags nothing or only its top
  class, so TABOR restores exactly `top_k` classes.
- **How a restored class is judged**: TABOR's MAD needs the metric (eq. 5) of every class; over
  three or four values the median and MAD are noise. So each restored class's eq. (5) value is
  compared with a *fixed reference distribution* of that metric on clean classes:
  index = (reference_median - metric) / (1.4826 * reference_mad), kept on the low tail (negative
  -> 0), exactly the form of `mad_anomaly_index` with the median and MAD taken from the
  reference instead of from this model. The default reference was measured with full TABOR (all
  classes restored, default settings) on the Fashion-MNIST zoo's clean CNNs `fm-clean-cnn-s0/1/2`
  (30 class values, one thread): median -2.12, MAD 0.147 (rounded to 0.15); the lowest of the 30
  values scores 1.82, below the threshold 2. It is a property of TABOR's settings and of the kind
  of model, so a very different data set or architecture should measure and pass its own
  (`detector_settings["cascade"]`); a trojan's target usually scores far below (eq. 5 rewards a
  small trigger that pruning cannot shrink and that works on nearly every image).
- **Classes not restored** get TABOR anomaly index 0.0: TABOR has no evidence against them and
  the ranker ranked them below the suspects. 0.0 means "not examined by TABOR", not
  "examined and clean"; `notes.cascade.restored_classes` (and `restored_classes`) says which
  classes were examined. A trojan the ranker does not rank in its top k is missed; that is the
  price of the mode, and `benchmarks/speed.py` measures how often it happens on the zoo.
- Other detectors in the list (nc, ncpp) run in full as in `full` mode.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from scanner.anomaly import CONSISTENCY, flag
from scanner.data import CleanData
from scanner.detectors.base import DetectionResult
from scanner.detectors.tabor import Tabor
from scanner.errors import EXIT_USAGE, TrojanScanError

RANKERS = {"ni": ("combined", "low"), "hotspot": ("hotspot_ratio", "high")}  # statistic, suspicious tail


class CascadeUsageError(TrojanScanError):
    """`mode="fast"` without a ranker and TABOR in the detector list (CLI exit 4)."""

    exit_code = EXIT_USAGE


def choose_ranker(detectors: tuple[str, ...] | list[str], ranker: str = "auto") -> str:
    """The detector that ranks the classes: `ranker`, or for "auto" hotspot when listed, else ni.
    Refuses the fast mode unless the ranker and TABOR are both requested."""
    chosen = ranker if ranker != "auto" else ("hotspot" if "hotspot" in detectors else "ni")
    missing = [name for name in (chosen, "tabor") if name not in detectors]
    if missing:
        raise CascadeUsageError(f"--mode fast needs the detectors {chosen},tabor (or hotspot,tabor); "
                                f"{','.join(missing)} missing from {','.join(detectors)}")
    return chosen


class CascadeSettings(BaseModel):
    """Settings of the cascade, given as `ScanSettings.detector_settings["cascade"]`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(3, ge=1, le=1000, description="the ranker's most suspicious classes TABOR restores "
                                                     "(besides the ones it flags)")
    ranker: Literal["auto", "ni", "hotspot"] = Field("auto", description="who ranks the classes; auto: hotspot "
                                                     "when it is among the detectors, else ni")
    reference_median: float = Field(-2.12, description="median of TABOR's eq. (5) metric on clean classes")
    reference_mad: float = Field(0.15, gt=0, description="median absolute deviation of that metric (before the "
                                                        "1.4826 consistency constant)")


def suspects(ranker: DetectionResult, top_k: int) -> tuple[list[int], list[int]]:
    """The ranker's order (most suspicious first, by its statistic; ties by class id) and the
    classes TABOR restores: the flagged ones plus the first `top_k` of the order."""
    statistic, tail = RANKERS[ranker.detector]
    values = np.asarray(ranker.statistics[statistic], dtype=np.float64)
    ranking = [int(k) for k in np.argsort(values if tail == "low" else -values, kind="stable")]
    return ranking, sorted(set(ranker.flagged_classes) | set(ranking[:top_k]))


def reference_index(metric: np.ndarray, median: float, mad: float) -> np.ndarray:
    """TABOR's MAD index of eq. (5) values against a fixed reference: low tail only."""
    return np.maximum((median - np.asarray(metric, dtype=np.float64)) / (CONSISTENCY * mad), 0.0)


def cascade_tabor(tabor: Tabor, ranker: DetectionResult, model: torch.nn.Module, data: CleanData,
                  num_classes: int, settings: CascadeSettings) -> DetectionResult:
    """TABOR restricted to the ranker's suspects; returns a full-length TABOR DetectionResult
    (index 0.0 for classes not restored, see the module docstring)."""
    started = time.perf_counter()
    if len(ranker.anomaly_index) != num_classes:
        raise TrojanScanError(f"cascade: {ranker.detector} scored {len(ranker.anomaly_index)} classes, "
                              f"the model has {num_classes}")
    ranking, chosen = suspects(ranker, settings.top_k)
    triggers, restored_stats, notes = tabor.restore_classes(model, data, num_classes, chosen)
    index = np.zeros(num_classes)
    index[chosen] = reference_index(restored_stats["tabor_metric"], settings.reference_median, settings.reference_mad)
    restored = np.zeros(num_classes)
    restored[chosen] = 1.0
    per_class = {str(k): {name: round(float(values[row]), 6) for name, values in restored_stats.items()}
                 for row, k in enumerate(chosen)}
    notes["cascade"] = {
        "mode": "fast", "restored_classes": chosen, "top_k": settings.top_k, "ranker": ranker.detector,
        "ranking": ranking,
        "reference": {"median": settings.reference_median, "mad": settings.reference_mad},
        "not_restored_index": f"0.0: not examined by TABOR ({ranker.detector} ranked the class below the suspects)",
        "restored_statistics": per_class,
    }
    return DetectionResult(
        detector=tabor.name, anomaly_index=index, flagged_classes=flag(index, tabor.settings.threshold),
        # per-class arrays only (the report indexes them by class); eq. (5) values are in the notes
        statistics={"restored": restored, "ranker_rank": np.argsort(ranking).astype(np.float64)},
        settings=tabor.settings.model_dump(), seed=tabor.seed, seconds=time.perf_counter() - started,
        triggers=triggers, notes=notes,
    )
