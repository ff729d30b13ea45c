"""Load a model file safely into a differentiable torch module that maps pixels to logits.

Formats are told apart by content, not by extension:

- **ONNX** (a protobuf `onnx` parses and `onnx.checker` accepts). Converted to torch with
  onnx2torch so detectors get input gradients; onnxruntime runs the original file on a check batch
  and the two must agree, so a conversion bug can never silently change what is scanned.
- **torch.export `.pt2`** (a zip with `archive_format` = `pt2`), loaded with
  `torch.export.load(...).module(check_guards=False)`.
- **pickle** (a `torch.save` zip holding `data.pkl`, or a raw pickle stream): unpickling runs
  arbitrary code, so it is refused unless the caller passes `allow_pickle=True`
  (`--allow-pickle`). Nothing is unpickled before that check.

The ONNX path lives in `scanner.onnx_loading`; the `.pt2` vetting (`torch.export.load` is not
safe on untrusted files: see `scanner.pt2_guard` for what it can run and what is checked before
and after loading) lives in `scanner.pt2_guard`. This module detects the format, applies the size
limits, loads trusted pickles and runs the checks every format gets.

The file is read once; its sha256 and everything parsed come from those same bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scanner.errors import DataError, ModelLoadError, TrojanScanError, UnsupportedModelError
from scanner.loading_common import CHECK_BATCH, _Loaded, _one_line, _zip_root_names
from scanner.onnx_loading import ONNX_TOLERANCE  # noqa: F401  (re-exported)
from scanner.onnx_loading import (_compare_reference, _load_onnx, _looks_like_onnx, _onnx_uses_external_data,
                                  _parse_onnx, embed_external_data, external_data_files)
from scanner.pt2_guard import _load_pt2

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_NODES = 100_000

FORMAT_ONNX = "onnx"
FORMAT_PT2 = "pt2"
FORMAT_PICKLE = "pickle"


@dataclass
class LoadedModel:
    """A model ready for detectors: `module` maps pixel-space (N, C, H, W) floats in [0, 1] to
    logits, is in eval mode and has frozen parameters (detectors differentiate w.r.t. inputs)."""

    module: nn.Module
    format: str  # "onnx" | "pt2" | "pickle"
    sha256: str  # of the bytes that were loaded
    path: str
    input_shape: tuple[int, int, int] | None  # (C, H, W) when the file states it
    num_classes: int | None  # from one forward pass on the check batch
    details: dict[str, Any] = field(default_factory=dict)


class PixelSpaceModel(nn.Module):
    """Wraps a classifier so that it takes pixel-space input.

    - applies the per-channel normalisation the model was trained with (if any), so triggers
      and masks stay in [0, 1] pixel space;
    - `train()`/`eval()` never reach a torch.export module (those raise NotImplementedError);
    - a program exported with a fixed batch size is fed in chunks of that size (the last
      chunk padded), so detectors can use any batch size.
    """

    def __init__(
        self,
        inner: nn.Module,
        normalization: tuple[list[float], list[float]] | None = None,
        *,
        inner_trainable: bool = True,
        static_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.inner_trainable = inner_trainable
        self.static_batch = static_batch
        if normalization is None:
            self.mean: torch.Tensor | None = None
            self.std: torch.Tensor | None = None
        else:
            mean, std = normalization
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space -> the input space the wrapped model expects."""
        if self.mean is None:
            return x
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalise(x)
        size = self.static_batch
        if size is None or x.shape[0] == size:
            return self.inner(x)
        outputs = []
        for chunk in torch.split(x, size):
            n = chunk.shape[0]
            if n < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
            outputs.append(self.inner(chunk)[:n])
        return torch.cat(outputs)

    def train(self, mode: bool = True) -> PixelSpaceModel:
        self.training = mode
        if self.inner_trainable:
            self.inner.train(mode)
        return self


def load_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    normalization: tuple[list[float], list[float]] | None = None,
    check_data: np.ndarray | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> LoadedModel:
    """Load an ONNX, torch.export `.pt2` or (only with `allow_pickle`) pickled torch model.

    `normalization` is (mean, std) per channel; the returned module applies it, so it takes
    pixels in [0, 1]. `check_data` (N, C, H, W float32 in [0, 1]) is used for the consistency
    checks (onnxruntime vs torch, finite logits); without it a fixed random batch of the
    model's input shape is used.

    Raises ModelLoadError (exit 2) for a missing, oversized, corrupt, refused or inconsistent
    file, UnsupportedModelError (exit 3) for a file in no supported format, DataError for
    check data that does not fit. Every message is one line.
    """
    path = Path(path)
    _check_normalization(normalization)
    raw = _read_bytes(path, max_bytes)
    fmt, onnx_model = _detect_format(raw, path)
    external = external_data_files(onnx_model, path, max_bytes) if onnx_model is not None else []
    digest = _digest(raw, external)
    if onnx_model is not None and _onnx_uses_external_data(onnx_model.graph):
        embed_external_data(onnx_model, path, external, max_bytes)
        raw = onnx_model.SerializeToString()
    if fmt == FORMAT_PICKLE and not allow_pickle:
        raise ModelLoadError(
            f"refusing to unpickle {path}: a pickled model can run arbitrary code when loaded; "
            "pass --allow-pickle to trust it, or export it to ONNX or torch.export (.pt2)"
        )
    try:
        return _load_checked(raw, digest, fmt, onnx_model, path, normalization, check_data,
                             max_bytes, max_nodes)
    except TrojanScanError:
        raise
    except Exception as exc:  # anything unforeseen still ends as a one-line load error
        raise ModelLoadError(
            f"cannot load model {path}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def _digest(raw: bytes, external_files: list[Path]) -> str:
    """sha256 of the model file, and of its external data files when it has any (in name order),
    so swapping a data file changes the digest a cached scan is keyed on."""
    if not external_files:
        return hashlib.sha256(raw).hexdigest()
    combined = hashlib.sha256(hashlib.sha256(raw).digest())
    for file in external_files:
        with open(file, "rb") as handle:  # in blocks: external data can be as large as the limit
            file_hash = hashlib.file_digest(handle, "sha256").digest()
        combined.update(file.name.encode() + b"\0" + file_hash)
    return combined.hexdigest()


def model_digest(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The digest `load_model` records for this file (model bytes plus any ONNX external data)."""
    path = Path(path)
    raw = _read_bytes(path, max_bytes)
    onnx_model = None if raw.startswith((b"PK", b"\x80")) else _parse_onnx(raw)
    return _digest(raw, external_data_files(onnx_model, path, max_bytes) if onnx_model is not None else [])


def _load_checked(
    raw: bytes,
    digest: str,
    fmt: str,
    onnx_model: Any,
    path: Path,
    normalization: tuple[list[float], list[float]] | None,
    check_data: np.ndarray | None,
    max_bytes: int,
    max_nodes: int,
) -> LoadedModel:
    """Format-specific loading, then the wrapper and the checks every format gets."""
    if fmt == FORMAT_ONNX:
        loaded = _load_onnx(raw, onnx_model, path, max_nodes)
    elif fmt == FORMAT_PT2:
        loaded = _load_pt2(raw, path, max_bytes, max_nodes)
    else:
        loaded = _load_pickle(raw, path)
    if normalization is not None and loaded.input_shape is not None:
        channels = loaded.input_shape[0]
        if len(normalization[0]) not in (1, channels):
            raise DataError(
                f"normalization has {len(normalization[0])} channel values but model {path} "
                f"takes {channels} channels"
            )

    wrapped = PixelSpaceModel(
        loaded.module, normalization,
        inner_trainable=loaded.inner_trainable, static_batch=loaded.static_batch,
    )
    wrapped.eval()
    for param in wrapped.parameters():
        param.requires_grad_(False)

    details = dict(loaded.details)
    details["normalization"] = (
        None if normalization is None
        else {"mean": list(normalization[0]), "std": list(normalization[1])}
    )
    num_classes = _check_forward(wrapped, loaded, check_data, path, details)
    return LoadedModel(
        module=wrapped, format=fmt, sha256=digest, path=str(path),
        input_shape=loaded.input_shape, num_classes=num_classes, details=details,
    )


# --------------------------------------------------------------------------- reading, detection


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a regular file: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelLoadError(f"model file {path} is {size} bytes, over the limit of {max_bytes}")
    if size == 0:
        raise ModelLoadError(f"model file {path} is empty")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {_one_line(exc)}") from exc
    if len(raw) > max_bytes:  # grew since stat()
        raise ModelLoadError(f"model file {path} is over the limit of {max_bytes} bytes")
    return raw


def _detect_format(raw: bytes, path: Path) -> tuple[str, Any]:
    """Classify by content. Returns (format, parsed ONNX model or None)."""
    if raw.startswith(b"PK\x03\x04"):
        return _detect_zip(raw, path), None
    if raw.startswith(b"\x80"):  # pickle protocol >= 2 (torch.save legacy format too)
        return FORMAT_PICKLE, None
    onnx_model = _parse_onnx(raw)
    if onnx_model is not None:
        return FORMAT_ONNX, onnx_model
    if _looks_like_onnx(raw):
        raise ModelLoadError(
            f"{path} starts like an ONNX model but does not parse (truncated or corrupt)"
        )
    raise UnsupportedModelError(
        f"{path} is not a supported model format "
        "(ONNX, torch.export .pt2, or pickle with --allow-pickle)"
    )


def _detect_zip(raw: bytes, path: Path) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            _, names = _zip_root_names(zf)
            zf_names = zf.namelist()
            archive_format = _zip_read_small(zf, "archive_format")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"{path} is a corrupt zip archive: {_one_line(exc)}") from exc
    has_program = any(n.startswith("models/") and n.endswith(".json") for n in names)
    # a .pt2 with one entry renamed has no single root folder any more: still a (broken) .pt2,
    # which the archive check then refuses with exit 2 rather than "unsupported"
    nested_pt2 = any(re.fullmatch(r"[^/]+/(archive_format|models/[^/]+\.json)", n) for n in zf_names)
    if archive_format == b"pt2" or has_program or nested_pt2:
        return FORMAT_PT2
    if any(n.startswith("code/") for n in names) or "constants.pkl" in names:
        raise UnsupportedModelError(
            f"{path} is a TorchScript archive, which is not supported; export the model with "
            "torch.export (.pt2) or to ONNX"
        )
    if "data.pkl" in names:
        return FORMAT_PICKLE
    raise UnsupportedModelError(
        f"{path} is a zip archive but neither a torch.export .pt2 nor a torch.save file"
    )


def _zip_read_small(zf: zipfile.ZipFile, relative: str, limit: int = 64) -> bytes | None:
    root, names = _zip_root_names(zf)
    if relative not in names:
        return None
    info = zf.getinfo(f"{root}/{relative}" if root else relative)
    if info.file_size > limit:
        return None
    return zf.read(info)


def _check_normalization(normalization: tuple[list[float], list[float]] | None) -> None:
    if normalization is None:
        return
    try:
        mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in normalization)
    except (TypeError, ValueError) as exc:
        raise DataError(f"normalization must be (mean list, std list): {_one_line(exc)}") from exc
    if len(mean) != len(std) or len(mean) == 0:
        raise DataError(
            "normalization mean and std need the same non-zero length, "
            f"got {len(mean)} and {len(std)}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise DataError("normalization mean must be finite and std finite and > 0")


# --------------------------------------------------------------------------- pickle


def _load_pickle(raw: bytes, path: Path) -> _Loaded:
    """Only reached with allow_pickle=True: the caller trusts this file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(raw), weights_only=False, map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot unpickle {path}: {_one_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        hint = ""
        if isinstance(obj, dict):
            hint = " (a state_dict needs its architecture; save the whole model or export it)"
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module{hint}")
    details = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    return _Loaded(module=obj, input_shape=None, details=details)


# --------------------------------------------------------------------------- common checks


def _check_batch(
    check_data: np.ndarray | None, input_shape: tuple[int, int, int] | None, path: Path
) -> tuple[np.ndarray | None, str]:
    """Pixel-space images for the load checks: the caller's data, else a fixed random batch."""
    if check_data is not None:
        x = np.asarray(check_data)
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"check data must be images (N, C, H, W), got shape {x.shape}")
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"check data images have shape {tuple(x.shape[1:])} (C, H, W) but model {path} "
                f"expects {tuple(input_shape)}"
            )
        return np.ascontiguousarray(x[:CHECK_BATCH], dtype=np.float32), "data"
    if input_shape is None:
        return None, "none"
    rng = np.random.default_rng(0)
    return rng.random((4, *input_shape), dtype=np.float32), "random"


def _check_forward(
    wrapped: PixelSpaceModel,
    loaded: _Loaded,
    check_data: np.ndarray | None,
    path: Path,
    details: dict[str, Any],
) -> int | None:
    """One forward pass on the check batch: logits must be finite, (N, classes), and (for ONNX)
    agree with onnxruntime on the original file. Returns the number of classes."""
    x, source = _check_batch(check_data, loaded.input_shape, path)
    details["check_batch"] = {"source": source, "size": 0 if x is None else int(len(x))}
    if x is None:
        if loaded.reference is not None:
            raise ModelLoadError(
                f"ONNX model {path} does not state its input size; "
                "pass clean data to check the conversion"
            )
        return None
    inputs = torch.from_numpy(x)
    if loaded.shape_check is not None:  # sizes first, so a crafted shape cannot allocate without bound
        loaded.shape_check((loaded.static_batch or len(x), *x.shape[1:]))
    try:
        with torch.no_grad():
            logits = wrapped(inputs)
    except Exception as exc:
        raise ModelLoadError(
            f"forward pass of {path} failed on the check batch: {_one_line(exc)}"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelLoadError(
            f"{path} returns {shape} for {len(x)} images; logits (N, classes) are expected"
        )
    out = logits.float().numpy()
    if not np.isfinite(out).all():
        raise ModelLoadError(f"{path} produces NaN or infinite logits on the check batch")
    details["max_abs_logit"] = float(np.abs(out).max())
    if loaded.reference is not None:
        _compare_reference(wrapped, loaded.reference, inputs, out, path, details)
    return int(out.shape[1])
