"""The registry policy: which registry changes request a scan, where a clean version is promoted
to, how it is scanned and what happens to an infected one. A YAML file, validated with pydantic:

```yaml
defaults:                      # applies to every registered model
  request: {alias: candidate}  # or {stage: Staging}, or {on_register: true}
  target: {alias: champion}    # or {stage: Production}
  detectors: [ni, tabor]
  threshold: 2.0
models:
  traffic-signs:               # per registered model: only the fields that differ
    clean_data: /data/signs-clean.npz
    auto_unlearn: true
    unlearn_data: /data/signs-train-10k.npz  # patching needs thousands of images; scanning, hundreds
    unlearn: {epochs: 8}       # how an infected version is patched (scanner.unlearning.UnlearnSettings)
```

`scan_all_models: false` (the default) means only the models listed under `models` are watched;
webhook events for other models are ignored, never promoted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scanner.errors import TrojanScanError
from scanner.scan import DEFAULT_DETECTORS, ScanSettings
from scanner.unlearning import UnlearnSettings


class PolicyError(TrojanScanError):
    """The policy file is missing, not YAML, or does not validate."""


class RegistryPlace(BaseModel):
    """An alias or a stage of a registered model (exactly one of them), or `on_register`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alias: str | None = None
    stage: Literal["Staging", "Production"] | None = None
    on_register: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> RegistryPlace:
        given = sum([self.alias is not None, self.stage is not None, self.on_register])
        if given != 1:
            raise ValueError("give exactly one of alias, stage, on_register")
        return self

    def describe(self) -> str:
        if self.alias is not None:
            return f"alias @{self.alias}"
        if self.stage is not None:
            return f"stage {self.stage}"
        return "registration"


class ModelPolicy(BaseModel):
    """Everything the gate needs for one registered model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: RegistryPlace = RegistryPlace(alias="candidate")
    target: RegistryPlace = RegistryPlace(alias="champion")
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    detector_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    threshold: float = Field(2.0, gt=0)
    verdict_rule: Literal["any", "all"] = Field(
        "any", description="infected when any enabled detector flags a class, or only when all do")
    seed: int = 0
    device: str = "auto"
    clean_data: str | None = Field(None, description="npz path or URI used when the version names none")
    allow_pickle: bool = False
    normalization: tuple[list[float], list[float]] | None = None
    auto_unlearn: bool = False
    auto_promote_patched: bool = False
    unlearn: UnlearnSettings = Field(default_factory=UnlearnSettings,
                                     description="how the unlearn-retrain flow patches an infected version")
    unlearn_data: str | None = Field(
        None, description="npz path or URI of the clean images a patch is fine-tuned on (and its CA measured on, "
        "a held-out share); None: the version's clean data. A patch needs far more images than a scan: the demo's "
        "model lost 4 points of CA patched on 400, 1 on 5000 (benchmarks/results/unlearning_data_size.md)")
    max_ca_drop: float = Field(0.01, ge=0, le=1, description="a patched version losing more CA is never promoted")
    ca_drop_check: Literal["estimate", "upper_bound"] = Field(
        "estimate", description="what max_ca_drop limits: the measured drop, or its upper confidence bound "
        "(unlearn.ca_drop_confidence, paired on the measured images), which a small clean set widens")
    min_images_per_class: int = Field(5, ge=1, description="clean images every class needs (ScanSettings)")
    min_clean_accuracy: float | None = Field(
        None, ge=0, le=1, description="the model's accuracy its clean data must reach, else the data is taken for "
        "another model's (None: max(2 x chance, 0.5); 0: no check; see ScanSettings)")
    max_scan_seconds: float = Field(3600, gt=0, description="a scan running longer ends as error")
    max_memory_mb: float | None = Field(None, gt=0, description="peak resident memory a scan may use")
    stale_claim_seconds: float = Field(
        300, gt=0, description="a `running` claim older than max_scan_seconds plus this is taken over (its flow died)")

    @model_validator(mode="after")
    def _target_differs(self) -> ModelPolicy:
        if self.target.on_register:
            raise ValueError("the target must be an alias or a stage")
        if self.request == self.target:
            raise ValueError("request and target must differ")
        return self

    def scan_settings(self) -> ScanSettings:
        # a threshold the policy does not set leaves each detector its own default (see run_detectors)
        threshold = {"threshold": self.threshold} if "threshold" in self.model_fields_set else {}
        return ScanSettings(detectors=self.detectors, **threshold, seed=self.seed, device=self.device,
                            detector_settings=self.detector_settings, verdict_rule=self.verdict_rule,
                            min_images_per_class=self.min_images_per_class,
                            min_clean_accuracy=self.min_clean_accuracy)

    def settings_hash(self) -> str:
        """What decides a verdict besides the model bytes: one scan per (sha256, this)."""
        payload = {"scan": self.scan_settings().model_dump(mode="json"), "normalization": self.normalization}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class Policy(BaseModel):
    """The whole policy file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str = "trojanscan"
    scan_all_models: bool = False
    defaults: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _entries_validate(self) -> Policy:
        ModelPolicy(**self.defaults)
        for name, overrides in self.models.items():
            try:
                ModelPolicy(**(self.defaults | (overrides or {})))
            except ValidationError as error:
                raise ValueError(f"models.{name}: {_first_error(error)}") from None
        return self

    def covers(self, name: str) -> bool:
        return self.scan_all_models or name in self.models

    def for_model(self, name: str) -> ModelPolicy:
        if not self.covers(name):
            raise PolicyError(f"registered model {name!r} is not in the policy (and scan_all_models is off)")
        return ModelPolicy(**(self.defaults | (self.models.get(name) or {})))


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def load_policy(path: str | Path | None) -> Policy:
    """Read and validate a policy file; None gives the defaults with every model covered."""
    if path is None:
        return Policy(scan_all_models=True)
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise PolicyError(f"cannot read policy {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"policy {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"policy {path} must be a mapping at the top level")
    try:
        return Policy(**raw)
    except ValidationError as error:
        raise PolicyError(f"policy {path}: {_first_error(error)}") from None
