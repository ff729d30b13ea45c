"""The MLflow adapter: the only module of `scanner` that talks to MLflow.

It resolves `models:/` references, downloads a version's files without unpickling anything,
finds the version's clean data, logs scan runs, and reads and writes the version tags, aliases
and stages of product.md's MLflow contract.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import yaml

from scanner.errors import DataError, TrojanScanError, UnsupportedModelError
from scanner.loading_common import _one_line

# The MLflow client retries a dead server for minutes by default; a scan should end as `error`
# (and the flow's own retry decide) well before that. Users can still override both.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _remember_missing_databricks_modules() -> None:
    """Every MLflow REST call asks whether it runs on Databricks by importing dbruntime,
    IPython and pyspark. Python does not remember a failed import, so where they are absent each
    call searches the whole sys.path again: about a quarter of a warm scan's CPU (some 50 calls a
    scan). An absent one is recorded as None in sys.modules, which makes the same import fail at
    once; one that is installed is left alone."""
    import importlib.util
    import sys

    for name in ("dbruntime", "IPython", "pyspark"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


_remember_missing_databricks_modules()

TAG = "trojanscan."
STATUS, VERDICT, FLAGGED = TAG + "status", TAG + "verdict", TAG + "flagged_classes"
SCAN_RUN_ID, SHA256, SCANNED_AT, ERROR = TAG + "scan_run_id", TAG + "model_sha256", TAG + "scanned_at", TAG + "error"
SETTINGS_HASH, CLEAN_DATA, GUARD = TAG + "settings_hash", TAG + "clean_data", TAG + "guard"
PATCHED_FROM, UNLEARN_RUN_ID = TAG + "patched_from", TAG + "unlearn_run_id"
CA_DROP, CA_DROP_BOUND = TAG + "ca_drop", TAG + "ca_drop_bound"  # a patched version's CA drop, and its upper bound
REQUESTED_BY = TAG + "requested_by"
PROMOTED_AT = TAG + "promoted_at"  # set by the gate alone: the versions the guard may fall back to
STATUSES = ("pending", "running", "clean", "infected", "error")
CLEAN_SAMPLES_ARTIFACT = "clean_samples.npz"

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


class RegistryError(TrojanScanError):
    """The registry answered, but not with what was asked for (unknown name, version, alias)."""


class RegistryUnavailable(TrojanScanError):
    """The tracking server could not be reached: the one transient error a flow retries."""


@dataclass(frozen=True)
class ModelReference:
    """`models:/NAME/VERSION`, `models:/NAME/STAGE` or `models:/NAME@ALIAS`."""

    name: str
    version: str | None = None
    alias: str | None = None
    stage: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelReference:
        match = _URI.match(uri)
        if not match:
            raise RegistryError(f"not a model URI: {uri!r} (use models:/NAME/VERSION, models:/NAME@ALIAS "
                                "or models:/NAME/STAGE)")
        name, version, alias = match["name"], match["version"], match["alias"]
        if version is not None and not version.isdigit():
            return cls(name=name, stage=version)
        return cls(name=name, version=version, alias=alias)

    def __str__(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version or self.stage}"


@dataclass(frozen=True)
class VersionInfo:
    """What the gate needs to know about one model version."""

    name: str
    version: str
    source: str
    run_id: str | None
    stage: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def status(self) -> str | None:
        return self.tags.get(STATUS)


@dataclass(frozen=True)
class DownloadedModel:
    """A version's files on disk and the one file the scanner loads."""

    folder: Path
    model_file: Path
    flavor: str  # "onnx" | "pytorch-pt2" | "pytorch-pickle" | "file"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _is_connection_error(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(word in text for word in ("ConnectionError", "Connection refused", "Max retries exceeded",
                                         "Failed to establish", "RemoteDisconnected", "timed out",
                                         "ReadTimeout", "ConnectTimeout"))


STORE_RACE_RETRIES = 4


def _is_store_race(error: BaseException) -> bool:
    return any(text in str(error) for text in ("UNIQUE constraint failed", "database is locked", "Deadlock found"))


@functools.cache
def _client_class() -> type:
    """MlflowClient that asks the server once per registered model, not once per call, whether
    the name is a prompt. MLflow checks that before every registry write and alias read (a GET
    of the registered model each time: 13 of the 60 requests of a scan); a registered model does
    not turn into a prompt while a flow runs. Overrides MLflow's private `_raise_if_prompt`: if
    a release renames it, the override is simply not called and every check runs again."""
    from mlflow import MlflowClient

    class CheckedOnceClient(MlflowClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._not_prompts: set[str] = set()

        def _raise_if_prompt(self, name: str) -> None:
            if name not in self._not_prompts:
                super()._raise_if_prompt(name)
                self._not_prompts.add(name)

    return CheckedOnceClient


class Registry:
    """An MLflow tracking server + model registry (or a local `sqlite:///` store)."""

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        self.client = _client_class()(tracking_uri=self.tracking_uri, registry_uri=registry_uri or self.tracking_uri)
        self._experiment_ids: dict[str, str] = {}  # a scan asks three times; an id never changes

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the MLflow client, sorting failures into unavailable (transient) or not found.

        A write race inside the server's SQL store (two flows tagging one version at once gives
        "UNIQUE constraint failed" from MLflow's select-then-insert) is retried here: every call
        the gate makes is idempotent."""
        from mlflow.exceptions import MlflowException

        for attempt in range(STORE_RACE_RETRIES):
            try:
                return function(*args, **kwargs)
            except MlflowException as error:
                if _is_store_race(error) and attempt + 1 < STORE_RACE_RETRIES:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                self._raise(what, error)
            except OSError as error:
                if _is_connection_error(error) or isinstance(error, ConnectionError):
                    raise RegistryUnavailable(f"MLflow at {self.tracking_uri} unreachable while {what}") from error
                raise

    def _raise(self, what: str, error: Exception) -> NoReturn:
        if _is_connection_error(error):
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri} unreachable while {what}") from error
        if _is_store_race(error):  # transient too: the caller's retry comes later
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: store write conflict while {what}") from error
        raise RegistryError(f"{what}: {_one_line(error)[:300]}") from None

    # -- versions -------------------------------------------------------------------------
    def _info(self, version: Any) -> VersionInfo:
        return VersionInfo(name=version.name, version=str(version.version), source=version.source,
                           run_id=version.run_id or None, stage=version.current_stage or "None",
                           aliases=tuple(getattr(version, "aliases", []) or ()), tags=dict(version.tags or {}),
                           created_ms=int(version.creation_timestamp or 0))

    def get_version(self, name: str, version: str) -> VersionInfo:
        return self._info(self._call(f"reading {name} version {version}", self.client.get_model_version, name, str(version)))

    def resolve(self, reference: ModelReference | str) -> VersionInfo:
        """The version a `models:/` reference points at now."""
        ref = ModelReference.parse(reference) if isinstance(reference, str) else reference
        if ref.version:
            return self.get_version(ref.name, ref.version)
        if ref.alias:
            return self._info(self._call(f"resolving {ref}", self.client.get_model_version_by_alias, ref.name, ref.alias))
        in_stage = [v for v in self.versions(ref.name) if v.stage.lower() == (ref.stage or "").lower()]
        if not in_stage:
            raise RegistryError(f"{ref}: no version of {ref.name!r} is in stage {ref.stage!r}")
        return max(in_stage, key=lambda v: int(v.version))

    def versions(self, name: str) -> list[VersionInfo]:
        found = self._call(f"listing versions of {name}", self.client.search_model_versions, f"name = '{name}'")
        # search results may omit aliases; fetch each version for the full record
        return sorted((self.get_version(name, str(v.version)) for v in found), key=lambda v: int(v.version))

    def registered_models(self) -> list[str]:
        return sorted(m.name for m in self._call("listing registered models", self.client.search_registered_models))

    def alias_holder(self, name: str, alias: str) -> VersionInfo | None:
        """The version holding `alias` (tags included), or None when no version holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as error:
            if _is_connection_error(error):
                raise RegistryUnavailable(f"MLflow at {self.tracking_uri} unreachable while reading @{alias}") from error
            return None

    def alias_version(self, name: str, alias: str) -> str | None:
        holder = self.alias_holder(name, alias)
        return holder.version if holder else None

    # -- tags, aliases, stages --------------------------------------------------------------
    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._call(f"tagging {name} version {version}", self.client.set_model_version_tag, name, str(version),
                       key, str(value))

    def delete_tag(self, name: str, version: str, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version_tag(name, str(version), key)
        except MlflowException as error:
            if _is_connection_error(error):
                raise RegistryUnavailable(f"MLflow at {self.tracking_uri} unreachable while untagging") from error

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(f"setting @{alias} on {name} version {version}", self.client.set_registered_model_alias,
                   name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(f"removing @{alias} from {name}", self.client.delete_registered_model_alias, name, alias)

    def set_stage(self, name: str, version: str, stage: str) -> None:
        import warnings

        with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still in use
            warnings.simplefilter("ignore", FutureWarning)
            self._call(f"moving {name} version {version} to {stage}", self.client.transition_model_version_stage,
                       name, str(version), stage, archive_existing_versions=False)

    # -- files --------------------------------------------------------------------------------
    def download_model(self, info: VersionInfo, dest: str | Path, allow_pickle: bool = False) -> DownloadedModel:
        """Download the version's files and pick the model file from its MLmodel (read as plain
        YAML; nothing is imported or unpickled here)."""
        import mlflow.artifacts

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        folder = Path(self._call(f"downloading {info.uri}", mlflow.artifacts.download_artifacts,
                                 artifact_uri=info.uri, dst_path=str(dest), tracking_uri=self.tracking_uri))
        if folder.is_file():
            return DownloadedModel(folder.parent, folder, "file")
        return choose_model_file(folder, allow_pickle)

    def download_run_artifact(self, run_id: str, path: str, dest: str | Path) -> Path:
        import mlflow.artifacts

        return Path(self._call(f"downloading {path} of run {run_id}", mlflow.artifacts.download_artifacts,
                               run_id=run_id, artifact_path=path, dst_path=str(dest), tracking_uri=self.tracking_uri))

    def resolve_clean_data(self, info: VersionInfo, policy_clean_data: str | None, dest: str | Path) -> tuple[Path, str]:
        """Clean data for a version, first found wins (product.md): the version's
        `trojanscan.clean_data` tag, the source run's `clean_samples.npz`, the policy's entry.
        Returns (local npz path, the reference it came from)."""
        dest = Path(dest)
        tagged = info.tags.get(CLEAN_DATA)
        if tagged:
            return self.fetch_uri(tagged, dest), tagged
        if info.run_id:
            local = self._run_clean_samples(info.run_id, dest)
            if local is not None:
                return local, f"runs:/{info.run_id}/{CLEAN_SAMPLES_ARTIFACT}"
        if policy_clean_data:
            return self.fetch_uri(policy_clean_data, dest), policy_clean_data
        raise DataError(f"no clean data for {info.uri}: set tag {CLEAN_DATA}, log {CLEAN_SAMPLES_ARTIFACT} "
                        "in the source run, or name clean_data in the policy")

    def _run_clean_samples(self, run_id: str, dest: Path) -> Path | None:
        """The run's clean_samples.npz on disk, or None when it has none. Four requests: the run's
        artifact location, its listing, and the file (whose download lists it once more);
        `download_artifacts(run_id=...)` after `list_artifacts(run_id)` took seven, reading the
        run three times and searching its logged models, on every scan."""
        import mlflow.artifacts

        root = self._call(f"reading run {run_id}", self.client.get_run, run_id).info.artifact_uri.rstrip("/")
        listed = self._call(f"listing artifacts of run {run_id}", mlflow.artifacts.list_artifacts,
                            artifact_uri=root, tracking_uri=self.tracking_uri)
        # listed paths start with the location's last part on a server (artifacts/...): compare names
        if not any(item.path.rsplit("/", 1)[-1] == CLEAN_SAMPLES_ARTIFACT and not item.is_dir for item in listed):
            return None
        return Path(self._call(f"downloading {CLEAN_SAMPLES_ARTIFACT} of run {run_id}", mlflow.artifacts.download_artifacts,
                               artifact_uri=f"{root}/{CLEAN_SAMPLES_ARTIFACT}", dst_path=str(dest),
                               tracking_uri=self.tracking_uri))

    def fetch_uri(self, uri: str, dest: Path) -> Path:
        """A `runs:/`, `models:/`, `file://` URI or a plain path of an npz, as a local file."""
        import mlflow.artifacts

        if uri.startswith(("runs:/", "models:/")):
            local = Path(self._call(f"downloading {uri}", mlflow.artifacts.download_artifacts, artifact_uri=uri,
                                    dst_path=str(dest), tracking_uri=self.tracking_uri))
            if local.is_dir():
                found = sorted(local.rglob("*.npz"))
                if not found:
                    raise DataError(f"clean data {uri} holds no .npz file")
                local = found[0]
            return local
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise DataError(f"clean data {uri} not found")
        return path

    # -- scan runs ----------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            self._experiment_ids[name] = self._find_or_create_experiment(name)
        return self._experiment_ids[name]

    def _find_or_create_experiment(self, name: str) -> str:
        found = self._call(f"reading experiment {name}", self.client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        try:
            return self._call(f"creating experiment {name}", self.client.create_experiment, name)
        except RegistryError:  # created by a concurrent scan in between
            return self._call(f"reading experiment {name}", self.client.get_experiment_by_name, name).experiment_id

    def find_scan_run(self, experiment: str, sha256: str, settings_hash: str) -> str | None:
        """A finished scan run of these model bytes with these settings, if one exists."""
        runs = self._call("searching scan runs", self.client.search_runs, [self.experiment_id(experiment)],
                          filter_string=(f"tags.`{SHA256}` = '{sha256}' and tags.`{SETTINGS_HASH}` = '{settings_hash}' "
                                         "and attributes.status = 'FINISHED'"),
                          max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def scan_result(self, run_id: str, dest: str | Path) -> dict[str, Any]:
        path = self.download_run_artifact(run_id, "result.json", dest)
        return json.loads(Path(path).read_text())

    def log_scan_run(self, experiment: str, result: dict[str, Any], out_dir: str | Path, tags: dict[str, str],
                     run_name: str) -> str:
        """One MLflow run per scan: settings as params, anomaly indices as metrics, and every file
        in `out_dir` as artifacts: the result JSON (written there by the caller), the report and
        the trigger/saliency pictures (product.md)."""
        out_dir = Path(out_dir)
        run = self._call("creating the scan run", self.client.create_run, self.experiment_id(experiment),
                         tags=tags, run_name=run_name)
        run_id = run.info.run_id
        try:
            self.log_result(run_id, result, out_dir)
        except Exception:
            with contextlib.suppress(Exception):  # the server may be the thing that failed
                self.client.set_terminated(run_id, status="FAILED")
            raise
        self._call("closing the scan run", self.client.set_terminated, run_id, status="FINISHED")
        return run_id

    def log_result(self, run_id: str, result: dict[str, Any], out_dir: Path) -> None:
        from mlflow.entities import Metric, Param

        settings = result.get("settings", {})
        params = [Param(key, json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value))
                  for key, value in settings.items()]
        now = int(datetime.now(timezone.utc).timestamp() * 1000)
        metrics = []
        for name, detection in result.get("detectors", {}).items():
            for k, value in enumerate(detection.get("anomaly_index", [])):
                metrics.append(Metric(f"{name}.anomaly_index.class_{k}", float(value), now, 0))
            metrics.append(Metric(f"{name}.max_anomaly_index", float(detection.get("max_anomaly_index", 0.0)), now, 0))
            metrics.append(Metric(f"{name}.seconds", float(detection.get("seconds", 0.0)), now, 0))
        self._call("logging the scan", self.client.log_batch, run_id, metrics=metrics, params=params[:100])
        # the scan folder holds exactly what the run keeps (result.json, report.html, triggers/,
        # saliency/): one upload call, which asks the server for the run's artifact location once
        self._call("uploading the scan's files", self.client.log_artifacts, run_id, str(out_dir))

    def run_url(self, run_id: str, experiment: str) -> str:
        """Where a person looks at the run: the server's UI, or the local store's run id."""
        if self.tracking_uri.startswith("http"):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id(experiment)}/runs/{run_id}"
        return f"{self.tracking_uri} run {run_id}"


def choose_model_file(folder: Path, allow_pickle: bool) -> DownloadedModel:
    """Pick the file to scan from an MLflow model folder by reading `MLmodel` as YAML."""
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise UnsupportedModelError(f"{folder} has no MLmodel file; not an MLflow model")
    try:
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    except yaml.YAMLError:
        raise UnsupportedModelError(f"{mlmodel} is not valid YAML") from None
    if "onnx" in flavors:
        return DownloadedModel(folder, _inside(folder, flavors["onnx"].get("data", "model.onnx")), "onnx")
    if "pytorch" in flavors:
        data = _inside(folder, flavors["pytorch"].get("model_data", "data"))
        if (data / "model.pt2").is_file():
            return DownloadedModel(folder, data / "model.pt2", "pytorch-pt2")
        if (data / "model.pth").is_file():
            if not allow_pickle:
                raise TrojanScanError(f"{folder.name}: a pickled pytorch model; unpickling runs its code, so it is "
                                      "refused unless the policy (allow_pickle) or --allow-pickle trusts it")
            return DownloadedModel(folder, data / "model.pth", "pytorch-pickle")
    raise UnsupportedModelError(f"no supported flavor in {mlmodel} (found {sorted(flavors)}; need onnx or pytorch)")


def _inside(folder: Path, relative: str) -> Path:
    """A path from MLmodel, refused if it points outside the downloaded folder."""
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents and path != folder.resolve():
        raise UnsupportedModelError(f"MLmodel points outside the model folder: {relative!r}")
    return path


def temporary_folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
