"""Detectors, one module each, all behind `base.Detector`; `DETECTORS` maps names to classes."""

from scanner.detectors import ncpp, neural_cleanse, saliency_hotspot, tabor  # noqa: F401  (register themselves)
from scanner.detectors.base import DETECTORS, DetectionResult, Detector, DetectorSettings, RestoredTrigger

try:  # written alongside; registers "ni"
    from scanner.detectors import neuron_inspect  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["DETECTORS", "DetectionResult", "Detector", "DetectorSettings", "RestoredTrigger"]
