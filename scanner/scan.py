"""One scan: load the model safely, validate the clean data, run the detectors, decide the
verdict, and produce one `ScanResult` (the versioned result JSON). Everything else (CLI summary,
HTML report, MLflow logging, Prefect artifacts) is a rendering of that result."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from scanner import __version__
from scanner.data import CleanData
from scanner.detectors import DETECTORS, DetectionResult
from scanner.detectors.ncpp import same_restoration
from scanner.detectors.restoration import stamp
from scanner.errors import DataError, TrojanScanError
from scanner.images import normalise_heatmap, save_png

SCHEMA_VERSION = 1
DEFAULT_DETECTORS = ("ni", "tabor")
TOP_SUSPICIOUS = 3  # classes beyond the flagged ones whose triggers are saved as pictures


class ScanSettings(BaseModel):
    """What a scan runs with; recorded in the result so the scan can be reproduced.

    Two settings refuse clean data that cannot support a verdict (exit 2, status `error`):

    - `min_images_per_class`: trigger restoration (NC, TABOR, NC++) optimises, for each class,
      the smallest mask that sends the other classes' images to it, and NeuronInspect builds
      each class's saliency from its own images. With a handful of images per class a tiny mask
      can overfit them, so a clean class looks like an outlier or a trojan's small trigger is
      hidden among noisy ones; the anomaly index compares these numbers across classes and
      needs every class measured on enough images.
    - `min_clean_accuracy`: data from another model (another task's images and labels, with the
      same shape and label range) passes every format check, but the detectors then restore
      "triggers" from images the model does not recognise, and a trojan can read as clean.
      A working classifier labels its own clean data far better than chance, so the model's
      accuracy on the data must reach this share. None (the default) means
      max(2 x chance, 0.5): 0.5 for 4 classes or more, 2/K below that. 0 turns the check off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    detectors: tuple[str, ...] = Field(DEFAULT_DETECTORS, description="detector names, see DETECTORS")
    mode: Literal["full", "fast"] = "full"
    verdict_rule: Literal["any", "all"] = Field("any", description="infected when any enabled detector flags a "
                                                "class, or only when every one does")
    threshold: float = Field(2.0, gt=0, description="anomaly index at or above which a class is flagged")
    seed: int = 0
    device: str = Field("auto", description="auto, cpu or cuda[:n]")
    min_images_per_class: int = Field(5, ge=1, description="clean images every class needs (restoration "
                                      "and saliency are measured per class)")
    min_clean_accuracy: float | None = Field(None, ge=0, le=1, description="the model's accuracy the clean data must "
                                             "reach, else it is taken for another model's data; None: "
                                             "max(2 x chance, 0.5); 0: no check")
    detector_settings: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                         description="per detector, fields of its settings model")

    @model_serializer(mode="wrap")
    def _omit_automatic_accuracy(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the automatic accuracy floor only refuses data, it never changes a verdict: leaving it
        # out keeps the settings hashes (registry tags, benchmark caches) of earlier scans valid
        dumped = handler(self)
        if self.min_clean_accuracy is None:
            dumped.pop("min_clean_accuracy", None)
        if "threshold" in self.model_fields_set:
            # a threshold set by the caller reaches every detector, an unset one leaves each its own
            # default (run_detectors): the two give different verdicts, so they must hash apart
            dumped["threshold_applies_to_all"] = True
        return dumped

    def accuracy_floor(self, num_classes: int) -> float:
        """The clean accuracy a model with `num_classes` classes must reach on the clean data."""
        if self.min_clean_accuracy is not None:
            return self.min_clean_accuracy
        return max(2.0 / num_classes, 0.5)


def check_clean_accuracy(module: torch.nn.Module, data: CleanData, num_classes: int, settings: ScanSettings) -> float:
    """The model's accuracy on the clean data; DataError when it is below the settings' floor
    (the data most likely belongs to another model, see ScanSettings)."""
    from scanner.training import accuracy

    achieved = accuracy(module, data)
    floor = settings.accuracy_floor(num_classes)
    if achieved < floor:
        raise DataError(f"the model labels only {achieved:.1%} of the clean data correctly (chance "
                        f"{1 / num_classes:.1%}, at least {floor:.1%} needed): the clean data seems to belong "
                        f"to another model or task")
    return achieved


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrojanScanError("--device cuda was asked for but no CUDA device is available")
    return device


def place_on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to the scan's device; on a CPU also put its 4-D weights channels-last.

    Why: oneDNN's channels-last (NHWC) convolutions run the detectors' forward+backward passes
    1.3-1.8x faster on the zoo's CNNs and ResNets on 2 CPU cores than the NCHW layout the ONNX
    conversion produces (fastest-batch images/s side by side, 2026-12-05: gtsrb_cnn 2000 -> 3220,
    nc_mnist 5150 -> 6940, both resnet_small about 1.3x). Inputs stay NCHW: a convolution with
    channels-last weights takes either layout. The numbers it computes are the same up to float
    rounding. On a GPU the layout is left alone (not measured there)."""
    module = module.to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "trojanscan": __version__}
    for name in ("torch", "numpy", "onnx", "onnxruntime-gpu", "onnx2torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@dataclass
class ScanResult:
    """The outcome of one scan; `to_json()` is the result JSON of product.md."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: ScanSettings
    detections: dict[str, DetectionResult] = field(default_factory=dict)
    verdict: Literal["clean", "infected", "error"] = "error"
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    # torch's intra-op threads: they change the rounding, which can move an anomaly index
    # (README, "Scanning a model"), so a rerun that should reproduce a verdict needs the same
    threads: int = field(default_factory=torch.get_num_threads)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. registry name/version, ground truth

    @property
    def flagged_classes(self) -> list[int]:
        return sorted({k for d in self.detections.values() for k in d.flagged_classes})

    def to_json(self) -> dict[str, Any]:
        detectors = {}
        for name, detection in self.detections.items():
            detectors[name] = detection.to_json() | {"artifacts": self.artifacts.get(name, {})}
        return {
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "errors": self.errors,
            "flagged_classes": self.flagged_classes,
            "model": self.model,
            "data": self.data,
            "settings": self.settings.model_dump(mode="json"),
            "detectors": detectors,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "device": self.device,
            "threads": self.threads,
            "versions": package_versions(),
            **self.extra,
        }


def decide(detections: dict[str, DetectionResult], rule: str = "any") -> tuple[str, list[str]]:
    """Verdict: `any` (the default) is infected when any enabled detector flags a class, `all`
    only when every enabled detector flags at least one."""
    reasons = []
    for name, detection in detections.items():
        for k in detection.flagged_classes:
            reasons.append(f"{name} flags class {k} (anomaly index {detection.anomaly_index[k]:.2f})")
    flagging = [name for name, detection in detections.items() if detection.flagged_classes]
    if rule == "all" and flagging and len(flagging) < len(detections):
        quiet = sorted(set(detections) - set(flagging))
        return "clean", reasons + [f"verdict rule 'all': {', '.join(quiet)} flag(s) nothing, so not infected"]
    if reasons:
        return "infected", reasons
    best = ", ".join(f"{n} max index {d.max_anomaly_index:.2f}" for n, d in detections.items())
    return "clean", [f"no class reaches the threshold ({best})"]


def scan_fraction(detectors: tuple[str, ...], detector: str, done: int, total: int) -> float:
    """How far a scan is (0..1) when `detector` has finished `done` of its `total` classes."""
    position = detectors.index(detector) if detector in detectors else 0
    return (position + done / max(total, 1)) / len(detectors)


def run_detectors(model: torch.nn.Module, data: CleanData, num_classes: int, settings: ScanSettings,
                  device: torch.device, progress=None) -> dict[str, DetectionResult]:
    """Run each requested detector with its settings (the threshold from the scan settings when
    the caller set one there, else the detector's own default)."""
    unknown = [name for name in settings.detectors if name not in DETECTORS]
    if unknown:
        raise TrojanScanError(f"unknown detector(s) {unknown}; known: {sorted(DETECTORS)}")
    cascade = None
    if settings.mode == "fast":
        # the NeuronInspect -> TABOR cascade (scanner/cascade.py): NI runs first, TABOR restores its suspects
        from scanner.cascade import CascadeSettings, choose_ranker

        cascade = CascadeSettings(**settings.detector_settings.get("cascade", {}))
        ranker = choose_ranker(settings.detectors, cascade.ranker)
    order = sorted(settings.detectors, key=lambda name: name != ranker) if cascade else list(settings.detectors)
    if "nc" in order and "ncpp" in order:  # NC++ judges NC's restoration; NC first lets it reuse it
        order.remove("nc")
        order.insert(order.index("ncpp"), "nc")
    results: dict[str, DetectionResult] = {}
    used: dict[str, Any] = {}  # each detector's settings, as run
    for name in order:
        cls = DETECTORS[name]
        own = dict(settings.detector_settings.get(name, {}))
        # a threshold the caller set applies to every detector; otherwise each keeps its own
        # default (2 for the published detectors, 3 for `hotspot`, see its module)
        if "threshold" in settings.model_fields_set:
            own.setdefault("threshold", settings.threshold)
        detector_settings = used[name] = cls.settings_model(**own)
        kwargs = {"seed": settings.seed, "device": device}
        if progress is not None:
            kwargs["progress"] = progress
        detector = cls(detector_settings, **kwargs)
        if cascade is not None and name == "tabor":
            from scanner.cascade import cascade_tabor

            results[name] = cascade_tabor(detector, results[ranker], model, data, num_classes, cascade)
        elif name == "ncpp" and "nc" in results and same_restoration(detector_settings, used["nc"]):
            results[name] = detector.judge_neural_cleanse(model, data, results["nc"])
        else:
            results[name] = detector.scan(model, data, num_classes)
    return {name: results[name] for name in settings.detectors}  # the requested order, as in full mode


def save_artifacts(result: ScanResult, data: CleanData, out_dir: Path) -> None:
    """Write restored triggers (flagged + most suspicious classes) and saliency maps as .npy/.png;
    record their paths, relative to out_dir, in result.artifacts."""
    example = data.x[0]  # the clean image the restored triggers are shown stamped on
    for name, detection in result.detections.items():
        chosen = list(detection.flagged_classes)
        for k in np.argsort(-detection.anomaly_index):
            if len(chosen) >= len(detection.flagged_classes) + TOP_SUSPICIOUS:
                break
            if int(k) not in chosen:
                chosen.append(int(k))
        files: dict[str, Any] = {}
        for k in chosen:
            entry: dict[str, str] = {}
            if k in detection.triggers:
                trigger = detection.triggers[k]
                base = out_dir / "triggers" / name / f"class_{k}"
                base.parent.mkdir(parents=True, exist_ok=True)
                np.save(f"{base}_mask.npy", trigger.mask)
                np.save(f"{base}_pattern.npy", trigger.pattern)
                stamped = stamp(torch.from_numpy(example[None]), torch.from_numpy(trigger.mask)[None, None],
                                torch.from_numpy(trigger.pattern)[None])[0].numpy()
                pictures = {"mask": trigger.mask, "pattern": trigger.pattern * trigger.mask[None], "stamped": stamped}
                if trigger.refined_mask is not None:
                    pictures["refined_mask"] = trigger.refined_mask
                for kind, picture in pictures.items():
                    entry[kind] = str(save_png(picture, f"{base}_{kind}.png").relative_to(out_dir))
                entry["mask_npy"] = str(Path(f"{base}_mask.npy").relative_to(out_dir))
                entry["pattern_npy"] = str(Path(f"{base}_pattern.npy").relative_to(out_dir))
            if k in detection.heatmaps:
                path = save_png(normalise_heatmap(detection.heatmaps[k]), out_dir / "saliency" / name / f"class_{k}.png")
                entry["saliency"] = str(path.relative_to(out_dir))
            if entry:
                files[str(k)] = entry
        result.artifacts[name] = files


def scan_model(model_path: str | Path, data_path: str | Path, settings: ScanSettings, out_dir: str | Path | None = None,
               allow_pickle: bool = False, normalization: tuple[list[float], list[float]] | None = None,
               progress=None, model_reference: str | None = None) -> ScanResult:
    """Scan a model file with a clean-data npz. Raises TrojanScanError subclasses on bad input;
    the caller turns those into an `error` result (never `clean`)."""
    from scanner.model_io import load_model

    started = time.perf_counter()
    device = resolve_device(settings.device)
    data = CleanData.load_npz(data_path)
    loaded = load_model(model_path, allow_pickle=allow_pickle, normalization=normalization,
                        check_data=data.x[:64])
    load_seconds = time.perf_counter() - started
    num_classes = loaded.num_classes
    if num_classes is None or num_classes < 3:
        raise DataError(f"the model has {num_classes} outputs; a scan needs at least 3 classes")
    data.check_fits(num_classes, loaded.input_shape, min_per_class=settings.min_images_per_class)
    # the check runs on the CPU: on a CPU scan after the channels-last layout (the forward over
    # 500 Fashion-MNIST images, one thread: 53 -> 28 ms), before a GPU scan's .to(device)
    on_cpu = device.type == "cpu"
    module = place_on_device(loaded.module, device) if on_cpu else loaded.module
    clean_accuracy = check_clean_accuracy(module, data, num_classes, settings)
    if not on_cpu:
        module = place_on_device(module, device)
    result = ScanResult(
        model={"reference": model_reference or str(model_path), "path": str(model_path), "format": loaded.format,
               "sha256": loaded.sha256, "input_shape": list(data.image_shape), "num_classes": num_classes,
               "normalization": normalization, "load_details": loaded.details},
        data={"reference": str(data_path), "images": len(data), "image_shape": list(data.image_shape),
              "images_per_class": np.bincount(data.y, minlength=num_classes).tolist(),
              "clean_accuracy": round(clean_accuracy, 4)},
        settings=settings, device=str(device),
    )
    result.detections = run_detectors(module, data, num_classes, settings, device, progress)
    result.verdict, result.reasons = decide(result.detections, settings.verdict_rule)
    result.timings = {"load": load_seconds, **{f"{n}": d.seconds for n, d in result.detections.items()},
                      "total": time.perf_counter() - started}
    if out_dir is not None:
        save_artifacts(result, data, Path(out_dir))
    return result


def error_result(reason: str, model_reference: str, data_reference: str | None, settings: ScanSettings) -> ScanResult:
    """A result that records a failed scan: verdict `error`, never clean."""
    return ScanResult(model={"reference": model_reference, "sha256": None}, data={"reference": data_reference},
                      settings=settings, verdict="error", reasons=[reason], errors=[reason])
