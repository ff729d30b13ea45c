"""NC++ (TABOR paper, section V): Neural Cleanse's restoration judged by TABOR's pruning (eq. 4)
and anomaly metric (eq. 5) instead of the mask-norm MAD."""

from __future__ import annotations

import time

import torch

from scanner.anomaly import flag
from scanner.data import CleanData
from scanner.detectors.base import DetectionResult, Detector, register
from scanner.detectors.neural_cleanse import restore_all, restored_triggers
from scanner.detectors.tabor import TaborSettings, judge_with_tabor_metric


class NCPlusPlusSettings(TaborSettings):
    """TABOR's settings; only the pruning fields and the threshold are used (restoration is NC's)."""


@register
class NCPlusPlus(Detector):
    name = "ncpp"
    settings_model = NCPlusPlusSettings

    def scan(self, model: torch.nn.Module, data: CleanData, num_classes: int) -> DetectionResult:
        started = time.perf_counter()
        s: NCPlusPlusSettings = self.settings  # type: ignore[assignment]
        outcome, notes = restore_all(self, model, data, num_classes)
        triggers = restored_triggers(model, data, outcome, self.device)
        index, statistics = judge_with_tabor_metric(self, model, data, triggers, outcome.mask_l1, outcome.slots, s)
        return DetectionResult(
            detector=self.name, anomaly_index=index, flagged_classes=flag(index, s.threshold),
            statistics=statistics, settings=s.model_dump(), seed=self.seed,
            seconds=time.perf_counter() - started, triggers=triggers, notes=notes,
        )
