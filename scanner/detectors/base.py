"""The one interface every detector implements, and the registry of detectors by name.

A detector takes a model (a torch module mapping pixel-space images in [0, 1] to logits; any
normalisation is already folded in by the loader) and clean data, and returns a
`DetectionResult`: per-class statistics, an anomaly index per class, the flagged classes,
restored triggers where the method restores, timings, settings and seed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from scanner.data import CleanData

# progress(detector_name, done, total): called during long optimisations.
Progress = Callable[[str, int, int], None]


def no_progress(name: str, done: int, total: int) -> None:
    return None


class DetectorSettings(BaseModel):
    """Settings every detector shares; each detector extends this with its own fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(2.0, gt=0, description="a class is flagged when its anomaly index is >= this")


@dataclass
class RestoredTrigger:
    """A restored trigger in pixel space: mask (H, W) in [0, 1], pattern (C, H, W) in [0, 1]."""

    mask: np.ndarray
    pattern: np.ndarray
    refined_mask: np.ndarray | None = None  # TABOR's pruned mask (eq. 4)
    attack_success: float | None = None  # share of non-target clean images sent to the class


@dataclass
class DetectionResult:
    detector: str
    anomaly_index: np.ndarray  # one per class; larger = more suspicious
    flagged_classes: list[int]
    statistics: dict[str, np.ndarray]  # per-class statistics the index was computed from
    settings: dict[str, Any]
    seed: int
    seconds: float
    triggers: dict[int, RestoredTrigger] = field(default_factory=dict)  # class -> restored trigger
    heatmaps: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (H, W) saliency map
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def max_anomaly_index(self) -> float:
        return float(np.max(self.anomaly_index))

    def to_json(self) -> dict[str, Any]:
        """The detector's part of the result JSON (arrays of triggers are written as files)."""
        return {
            "anomaly_index": [round(float(v), 6) for v in self.anomaly_index],
            "max_anomaly_index": round(self.max_anomaly_index, 6),
            "flagged_classes": self.flagged_classes,
            "statistics": {k: [round(float(x), 6) for x in v] for k, v in self.statistics.items()},
            "settings": self.settings,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "restored_classes": sorted(self.triggers),
            "attack_success": {str(k): t.attack_success for k, t in sorted(self.triggers.items())},
            **({"notes": self.notes} if self.notes else {}),
        }


class Detector(abc.ABC):
    """Base class: `name`, a settings model, and `scan(model, clean_data) -> DetectionResult`."""

    name: ClassVar[str]
    settings_model: ClassVar[type[DetectorSettings]] = DetectorSettings

    def __init__(self, settings: DetectorSettings | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: Progress = no_progress) -> None:
        self.settings = settings if settings is not None else self.settings_model()
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress

    @abc.abstractmethod
    def scan(self, model: torch.nn.Module, data: CleanData, num_classes: int) -> DetectionResult:
        """Inspect `model` (eval mode, pixel-space input) with clean `data`."""


DETECTORS: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    DETECTORS[cls.name] = cls
    return cls
