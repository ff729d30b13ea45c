"""NC++ (TABOR paper, section V): Neural Cleanse's restoration judged by TABOR's pruning (eq. 4)
and anomaly metric (eq. 5) instead of the mask-norm MAD.

NC++ restores exactly what Neural Cleanse restores, so a scan that runs both restores once: given
Neural Cleanse's result with the same restoration settings and seed, `judge_neural_cleanse`
only prunes and scores its triggers (`run_detectors` does this; the result's notes say so)."""

from __future__ import annotations

import copy
import time

import torch

from scanner.anomaly import flag
from scanner.data import CleanData
from scanner.detectors.base import DetectionResult, Detector, RestoredTrigger, register
from scanner.detectors.neural_cleanse import restore_all, restored_triggers
from scanner.detectors.restoration import RestorationSettings
from scanner.detectors.tabor import TaborSettings, judge_with_tabor_metric


class NCPlusPlusSettings(TaborSettings):
    """TABOR's settings; only the pruning fields and the threshold are used (restoration is NC's)."""


def same_restoration(a: RestorationSettings, b: RestorationSettings) -> bool:
    """True when both settings restore the same triggers (every restoration field but the threshold)."""
    fields = [name for name in RestorationSettings.model_fields if name != "threshold"]
    return all(getattr(a, name) == getattr(b, name) for name in fields)


@register
class NCPlusPlus(Detector):
    name = "ncpp"
    settings_model = NCPlusPlusSettings

    def scan(self, model: torch.nn.Module, data: CleanData, num_classes: int) -> DetectionResult:
        started = time.perf_counter()
        outcome, notes = restore_all(self, model, data, num_classes)
        triggers = restored_triggers(model, data, outcome, self.device)
        return self._judge(model, data, triggers, outcome.mask_l1, outcome.slots, notes, started, outcome.bf16)

    def judge_neural_cleanse(self, model: torch.nn.Module, data: CleanData, nc: DetectionResult) -> DetectionResult:
        """NC++ from a Neural Cleanse result of the same model, data, seed and restoration
        settings: its triggers (copied, NC's own stay unpruned) pruned and scored by eq. (4)/(5).
        `seconds` counts this judging only; NC's restoration time is in the notes."""
        started = time.perf_counter()
        triggers: dict[int, RestoredTrigger] = {k: copy.deepcopy(t) for k, t in nc.triggers.items()}
        notes = {"restoration": "shared with nc", "restoration_seconds": round(nc.seconds, 3),
                 **{k: v for k, v in nc.notes.items() if k in ("slots", "steps", "device_probe", "precision")}}
        return self._judge(model, data, triggers, nc.statistics["mask_l1"], nc.notes["slots"], notes, started,
                           nc.notes.get("precision") == "bf16")

    def _judge(self, model: torch.nn.Module, data: CleanData, triggers: dict[int, RestoredTrigger], mask_l1,
               slots: int, notes: dict, started: float, bf16: bool) -> DetectionResult:
        s: NCPlusPlusSettings = self.settings  # type: ignore[assignment]
        index, statistics = judge_with_tabor_metric(self, model, data, triggers, mask_l1, slots, s, bf16)
        return DetectionResult(
            detector=self.name, anomaly_index=index, flagged_classes=flag(index, s.threshold),
            statistics=statistics, settings=s.model_dump(), seed=self.seed,
            seconds=time.perf_counter() - started, triggers=triggers, notes=notes,
        )
