"""Neural Cleanse (Wang et al., S&P 2019), the baseline: per class, the smallest mask that sends
clean images to the class (restoration in `restoration.py`); a class is flagged when its mask L1
norm is an outlier on the small side (MAD anomaly index > threshold)."""

from __future__ import annotations

import time

import numpy as np
import torch

from scanner.anomaly import flag, mad_anomaly_index
from scanner.data import CleanData
from scanner.detectors.base import DetectionResult, Detector, RestoredTrigger, register
from scanner.detectors.restoration import (
    RestorationOutcome,
    RestorationSettings,
    attack_success,
    plan_restoration,
    restore_triggers,
)


class NeuralCleanseSettings(RestorationSettings):
    pass


def mask_l1(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's size penalty: L1 norm of each class's mask, (A,1,H,W) -> (A,)."""
    return mask.abs().sum(dim=(1, 2, 3))


def restore_all(detector: Detector, model: torch.nn.Module, data: CleanData, num_classes: int,
                size_penalty=mask_l1, extra_terms=None) -> tuple[RestorationOutcome, dict]:
    """Run the batched restoration with the detector's settings; returns the outcome and notes."""
    settings: RestorationSettings = detector.settings  # type: ignore[assignment]
    slots, bf16, notes = plan_restoration(model, data.image_shape, detector.device, settings, num_classes)
    outcome = restore_triggers(
        model, data.x, data.y, num_classes, settings, detector.seed, detector.device, slots,
        size_penalty=size_penalty, extra_terms=extra_terms, progress=detector.progress, name=detector.name,
        bf16=bf16,
    )
    notes["slots"] = outcome.slots
    notes["steps"] = outcome.steps.tolist()
    return outcome, notes


def restored_triggers(model: torch.nn.Module, data: CleanData, outcome: RestorationOutcome,
                      device: torch.device) -> dict[int, RestoredTrigger]:
    """Every class's best trigger with its attack success on the clean data."""
    return {
        k: RestoredTrigger(
            mask=outcome.masks[k], pattern=outcome.patterns[k],
            attack_success=attack_success(model, data.x, data.y, outcome.masks[k], outcome.patterns[k], k, device),
        )
        for k in range(len(outcome.masks))
    }


@register
class NeuralCleanse(Detector):
    name = "nc"
    settings_model = NeuralCleanseSettings

    def scan(self, model: torch.nn.Module, data: CleanData, num_classes: int) -> DetectionResult:
        started = time.perf_counter()
        outcome, notes = restore_all(self, model, data, num_classes)
        index = mad_anomaly_index(outcome.mask_l1, tail="low")
        return DetectionResult(
            detector=self.name,
            anomaly_index=index,
            flagged_classes=flag(index, self.settings.threshold),
            statistics={"mask_l1": outcome.mask_l1, "reached_threshold": outcome.reached.astype(np.float64)},
            settings=self.settings.model_dump(),
            seed=self.seed,
            seconds=time.perf_counter() - started,
            triggers=restored_triggers(model, data, outcome, self.device),
            notes=notes,
        )
