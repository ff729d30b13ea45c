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

Finding about `torch.export.load` (torch 2.13, read in `torch/export/pt2_archive/_package.py`
and `torch/_export/serde/serialize.py`): it is NOT safe on untrusted files, and its own
docstring says so ("uses pickle under the hood ... never load data from an untrusted source").
A crafted archive can run code through (3 and 4 were demonstrated here: a marker file was
written by a plain `torch.export.load`; the rest is read from the source):

1. payloads flagged `use_pickle` in `data/weights|constants/*_config.json`:
   `torch.load(..., weights_only=False)`;
2. constants named `opaque_obj_*` (`pickle.loads`) or `custom_obj_*` (TorchScript unpickler);
3. legacy `data/weights/<model>.pt` / `data/constants/<model>.pt` and the sample inputs
   `data/sample_inputs/<model>.pt`: `deserialize_torch_artifact` tries `weights_only=True` and
   on failure FALLS BACK to `weights_only=False`;
4. every symbolic-shape `expr_str` in `models/<model>.json` goes through `sympy.sympify`, which
   calls `eval`;
5. graph node targets are resolved by walking attributes from `torch`, `_operator` or `math`
   (`torch.os.system` resolves to `os.system`); torch's dialect verifier then rejects most
   non-operator callables (checked: `torch.os.system` fails with SpecViolationError), but it
   still admits a list of torch helper functions;
6. `guards_code` strings are `exec`'d when `.module()` builds its guard function
   (avoided here with `check_guards=False`);
7. `data/aotinductor/...` entries load compiled native code.

So before calling `torch.export.load` this module inspects the archive itself
(`_check_pt2_archive`): only the entries `torch.export.save` writes for a plain program, no
pickled payloads, sample inputs that load with `weights_only=True`, node targets restricted to
`torch.ops.aten.*` and a few symbolic-int operators, and `expr_str` strings restricted to a
small sympy grammar. After loading, every `call_function` target is checked again on the
deserialised graph.

The file is read once; its sha256 and everything parsed come from those same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import io
import json
import operator
import re
import sys
import tokenize
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from scanner.errors import DataError, ModelLoadError, TrojanScanError, UnsupportedModelError

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_NODES = 100_000
CHECK_BATCH = 8  # images used to cross-check onnxruntime against the converted model
ONNX_TOLERANCE = 1e-3  # absolute on logits, scaled by max(1, largest |logit|)

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


@dataclass
class _Loaded:
    """What a format loader hands back before the common checks."""

    module: nn.Module
    input_shape: tuple[int, int, int] | None
    details: dict[str, Any]
    inner_trainable: bool = True
    static_batch: int | None = None
    # runs the original file on normalised input (onnxruntime), to cross-check the conversion
    reference: Callable[[np.ndarray], np.ndarray] | None = None


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
    digest = hashlib.sha256(raw).hexdigest()
    fmt, onnx_model = _detect_format(raw, path)
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


def _one_line(exc: BaseException) -> str:
    """First line of an exception's message (never a traceback), or its type name."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours some messages
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return "".join(c for c in first if c.isprintable()) or type(exc).__name__


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


def _zip_root_names(zf: zipfile.ZipFile) -> tuple[str, list[str]]:
    """torch writes every entry under one top-level folder; return it and the relative names."""
    names = zf.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        return "", names
    root = roots.pop()
    return root, [name[len(root) + 1:] for name in names]


def _detect_zip(raw: bytes, path: Path) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            _, names = _zip_root_names(zf)
            archive_format = _zip_read_small(zf, "archive_format")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"{path} is a corrupt zip archive: {_one_line(exc)}") from exc
    has_program = any(n.startswith("models/") and n.endswith(".json") for n in names)
    if archive_format == b"pt2" or has_program:
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


def _parse_onnx(raw: bytes) -> Any:
    """The parsed ModelProto if these bytes are plausibly an ONNX model, else None."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError):
        return None
    # protobuf accepts many byte strings; an ONNX model has these
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        return None
    return model


def _looks_like_onnx(raw: bytes) -> bool:
    """Serializers write field 1 (ir_version, a small varint) first: bytes 0x08, 1..32."""
    return len(raw) >= 2 and raw[0] == 0x08 and 1 <= raw[1] <= 32


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


# --------------------------------------------------------------------------- ONNX


def _load_onnx(raw: bytes, model: Any, path: Path, max_nodes: int) -> _Loaded:
    import onnx

    graph = model.graph
    nodes = _count_onnx_nodes(graph)
    if nodes > max_nodes:
        raise ModelLoadError(f"ONNX model {path} has {nodes} nodes, over the limit of {max_nodes}")
    if _onnx_uses_external_data(graph):
        raise ModelLoadError(
            f"ONNX model {path} keeps tensors in external data files, which are not supported; "
            "save it with all tensors inside the file"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several checker/validation error types
        raise ModelLoadError(f"ONNX model {path} is invalid: {_one_line(exc)}") from exc

    input_shape = _onnx_input_shape(graph, path)
    if len(graph.output) != 1:
        raise ModelLoadError(
            f"ONNX model {path} has {len(graph.output)} outputs; one logits output is expected"
        )

    convert = _import_onnx2torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(model)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot convert ONNX model {path} to torch (onnx2torch): {_one_line(exc)}"
        ) from exc

    session = _ort_session(raw, path)
    input_name = session.get_inputs()[0].name

    def reference(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x.astype(np.float32)})[0]

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    details = {
        "onnx_opset": opset,
        "onnx_ir_version": int(model.ir_version),
        "onnx_producer": f"{model.producer_name} {model.producer_version}".strip(),
        "node_count": nodes,
        "onnxruntime_providers": session.get_providers(),
    }
    return _Loaded(module=module, input_shape=input_shape, details=details, reference=reference)


def _count_onnx_nodes(graph: Any) -> int:
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies)."""
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.HasField("g"):
                total += _count_onnx_nodes(attr.g)
            for sub in attr.graphs:
                total += _count_onnx_nodes(sub)
    return total


def _onnx_uses_external_data(graph: Any) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def _onnx_input_shape(graph: Any, path: Path) -> tuple[int, int, int] | None:
    """(C, H, W) from the single image input; None when those dims are symbolic."""
    import onnx

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelLoadError(
            f"ONNX model {path} has {len(inputs)} inputs; one image input is expected"
        )
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelLoadError(f"ONNX model {path} takes {name} input; float32 images are expected")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) != 4:
        raise ModelLoadError(
            f"ONNX model {path} takes rank-{len(dims)} input; images (N, C, H, W) are expected"
        )
    chw = dims[1:]
    if any(d is None or d <= 0 for d in chw):
        return None
    return (int(chw[0]), int(chw[1]), int(chw[2]))


def _ort_session(raw: bytes, path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {path}: {_one_line(exc)}") from exc


def _import_onnx2torch() -> Callable[[Any], nn.Module]:
    """Import onnx2torch.convert. onnx2torch imports torchvision (only for NMS and RoiAlign) and
    the torchvision wheels here cannot load beside CPU torch: if the real import fails, put a
    stand-in in sys.modules for the import and take it out again afterwards, so other code
    still sees that torchvision is missing."""
    if "onnx2torch" in sys.modules:
        from onnx2torch import convert

        return convert
    try:
        import torchvision  # noqa: F401
    except Exception:
        stand_ins = _torchvision_stand_in()
        _drop_modules("torchvision")
        sys.modules.update(stand_ins)
        try:
            from onnx2torch import convert
        finally:
            for name, module in stand_ins.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
        return convert
    from onnx2torch import convert

    return convert


def _drop_modules(package: str) -> None:
    """Remove a half-imported package (a failed import can leave submodules behind)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "torchvision is not available: ONNX NMS and RoiAlign are unsupported"
        )

    root = types.ModuleType(
        "torchvision", "stand-in for onnx2torch; the real torchvision is unusable here"
    )
    root.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    root.__path__ = []  # type: ignore[attr-defined]
    ops = types.ModuleType("torchvision.ops", "stand-in: NMS and RoiAlign are unavailable")
    ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    for name in ("nms", "batched_nms", "roi_align", "box_convert"):
        setattr(ops, name, unavailable)
    root.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": root, "torchvision.ops": ops}


# --------------------------------------------------------------------------- torch.export .pt2

# Files torch.export.save writes for a plain program (relative to the archive's root folder).
_PT2_FIXED_ENTRIES = {
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
}
_PT2_ATEN_TARGET = re.compile(
    r"torch\.ops\.aten\.(?!.*__)[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*"
)
_PT2_DENIED_ATEN = {"from_file"}  # reads arbitrary files
_SYM_OPERATORS = ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne",
                  "lt", "le", "gt", "ge", "and_", "or_", "getitem")
_PT2_OTHER_TARGETS = {f"_operator.{name}" for name in _SYM_OPERATORS} | {
    "math.ceil", "math.floor", "math.trunc", "torch.sym_float", "torch.sym_int", "torch.sym_max",
    "torch.sym_min", "torch.sym_not", "torch.sym_sqrt", "torch.sym_ite",
}
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo", "FloorDiv", "CeilDiv", "CleanDiv",
    "ModularIndexing", "Where", "PythonMod", "CeilToInt", "FloorToInt", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    # Symbol(...) assumptions
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
    "nonzero", "even", "odd", "rational",
}
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_SYMPY_OPS = {
    "(", ")", ",", "+", "-", "*", "/", "%", "**", "//", "=", "==", "!=", "<", "<=", ">", ">=",
    "&", "|", "~",
}
_SYMBOL_STRING = re.compile(r"'[a-z]+[0-9]+'|\"[a-z]+[0-9]+\"")


def _load_pt2(raw: bytes, path: Path, max_bytes: int, max_nodes: int) -> _Loaded:
    details = _check_pt2_archive(raw, path, max_bytes, max_nodes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(raw))
    except Exception as exc:
        raise ModelLoadError(f"cannot load torch.export program {path}: {_one_line(exc)}") from exc
    _check_pt2_graph_targets(program, path)

    user_inputs = list(program.graph_signature.user_inputs)
    user_outputs = list(program.graph_signature.user_outputs)
    if len(user_inputs) != 1 or len(user_outputs) != 1:
        raise ModelLoadError(
            f"torch.export program {path} has {len(user_inputs)} inputs and {len(user_outputs)} "
            "outputs; one image input and one logits output are expected"
        )
    shape = _pt2_input_dims(program, user_inputs[0])
    if shape is None or len(shape) != 4:
        rank = "unknown" if shape is None else len(shape)
        raise ModelLoadError(
            f"torch.export program {path} takes rank-{rank} input; "
            "images (N, C, H, W) are expected"
        )
    chw = shape[1:]
    input_shape = tuple(chw) if all(isinstance(d, int) for d in chw) else None
    static_batch = shape[0] if isinstance(shape[0], int) else None
    if static_batch is not None:
        details["static_batch"] = static_batch
    try:
        module = program.module(check_guards=False)  # no exec of the archive's guards_code
    except Exception as exc:
        raise ModelLoadError(f"cannot build a module from {path}: {_one_line(exc)}") from exc
    return _Loaded(
        module=module, input_shape=input_shape, details=details,  # type: ignore[arg-type]
        inner_trainable=False, static_batch=static_batch,
    )


def _pt2_input_dims(program: Any, name: str) -> list[Any] | None:
    """Input dims from the placeholder's fake tensor: ints for static dims, SymInts otherwise."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                return [d if isinstance(d, int) else None for d in value.shape]
    return None


def _check_pt2_archive(raw: bytes, path: Path, max_bytes: int, max_nodes: int) -> dict[str, Any]:
    """Refuse anything in a .pt2 archive that torch.export.load would unpickle, eval or exec
    (see the module docstring). Returns details for the report."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            root, names = _zip_root_names(zf)
            total = sum(info.file_size for info in zf.infolist())
            if total > max_bytes:
                raise ModelLoadError(
                    f"{path} unpacks to {total} bytes, over the limit of {max_bytes}"
                )

            def read(relative: str) -> bytes:
                return zf.read(f"{root}/{relative}" if root else relative)

            if "archive_format" not in names or read("archive_format") != b"pt2":
                raise ModelLoadError(
                    f"{path} lacks the archive_format entry of a torch.export .pt2"
                )
            models = [n[len("models/"):-len(".json")] for n in names
                      if n.startswith("models/") and n.endswith(".json")]
            if len(models) != 1:
                raise ModelLoadError(
                    f"{path} holds {len(models)} exported programs; exactly one is expected"
                )
            model = models[0]
            allowed = set(_PT2_FIXED_ENTRIES) | {f"models/{model}.json"}
            allowed |= _pt2_payload_entries(read, names, model, "weights", path)
            allowed |= _pt2_payload_entries(read, names, model, "constants", path)
            sample = f"data/sample_inputs/{model}.pt"
            if sample in names:
                _check_weights_only(read(sample), path, sample)
                allowed.add(sample)
            unexpected = sorted(n for n in names if n not in allowed and not n.startswith("extra/"))
            if unexpected:
                raise ModelLoadError(
                    f"{path} contains entries a plain torch.export program does not have "
                    f"(refused as unsafe): {', '.join(unexpected[:3])}"
                )
            program = json.loads(read(f"models/{model}.json"))
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, AttributeError,
            TypeError) as exc:
        raise ModelLoadError(f"{path} is a corrupt .pt2 archive: {_one_line(exc)}") from exc

    nodes = _check_pt2_program_json(program, path, max_nodes)
    return {"node_count": nodes, "torch_export_schema": program.get("schema_version"),
            "torch_version_saved": program.get("torch_version")}


def _pt2_payload_entries(
    read: Callable[[str], bytes], names: list[str], model: str, kind: str, path: Path
) -> set[str]:
    """Entries of data/<kind>/ that are raw tensor bytes (never pickles); refuse the rest."""
    config_name = f"data/{kind}/{model}_{kind}_config.json"
    if config_name not in names:
        # no config means the legacy pickled `<model>.pt` layout (or an archive we do not know)
        present = [n for n in names if n.startswith(f"data/{kind}/")]
        if present:
            raise ModelLoadError(f"{path} stores {kind} in a pickled layout; refused as unsafe")
        return set()
    config = json.loads(read(config_name)).get("config", {})
    entries = {config_name}
    for fqn, meta in config.items():
        name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not (name.startswith("weight_") or name.startswith("tensor_")):
            raise ModelLoadError(
                f"{path} stores {kind[:-1]} {fqn!r} as a pickled object; refused as unsafe"
            )
        entries.add(f"data/{kind}/{name}")
    return entries


def _check_weights_only(payload: bytes, path: Path, entry: str) -> None:
    """torch.export.load retries sample inputs with weights_only=False when the safe load fails:
    refuse anything the safe unpickler rejects."""
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: {entry} does not load with weights_only=True (torch.export.load would retry "
            "it with full unpickling); refused as unsafe"
        ) from exc


def _check_pt2_program_json(program: Any, path: Path, max_nodes: int) -> int:
    """Check node targets and symbolic expressions before torch resolves or sympifies them."""
    if not isinstance(program, dict) or "graph_module" not in program:
        raise ModelLoadError(f"{path}: the exported program JSON lacks a graph")
    nodes = 0
    for item in _walk_json(program):
        if "target" in item and "inputs" in item and "outputs" in item:
            nodes += 1
            target = item["target"]
            if not _allowed_pt2_target(target):
                raise ModelLoadError(
                    f"{path} calls {str(target)[:80]!r}, which is not an aten operator; refused"
                )
        expr = item.get("expr_str")
        if expr is not None and not _safe_sympy_expr(expr):
            raise ModelLoadError(
                f"{path} has a symbolic shape expression outside the safe grammar; refused"
            )
    if nodes > max_nodes:
        raise ModelLoadError(
            f"torch.export program {path} has {nodes} nodes, over the limit of {max_nodes}"
        )
    return nodes


def _walk_json(value: Any) -> Any:
    """Every dict in a JSON value, depth first (iterative: nesting is attacker-controlled)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _allowed_pt2_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if _PT2_ATEN_TARGET.fullmatch(target):
        return target.split(".")[3] not in _PT2_DENIED_ATEN
    return target in _PT2_OTHER_TARGETS


def _safe_sympy_expr(expr: Any) -> bool:
    """True if `expr` uses only numbers, symbol names (s0, u3), arithmetic and comparisons, and
    the sympy functions torch's deserializer knows: no attributes, subscripts or other names,
    so sympify's eval cannot reach anything else."""
    if not isinstance(expr, str) or len(expr) > 10_000 or "__" in expr:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NUMBER:
            continue
        if tok.type == tokenize.NAME and (
            tok.string in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(tok.string)
        ):
            continue
        if tok.type == tokenize.OP and tok.string in _SYMPY_OPS:
            continue
        if tok.type == tokenize.STRING and _SYMBOL_STRING.fullmatch(tok.string):
            continue
        return False
    return True


def _check_pt2_graph_targets(program: Any, path: Path) -> None:
    """After loading: every call_function is an aten operator or a symbolic-int operator."""
    allowed_python = {getattr(operator, name) for name in _SYM_OPERATORS}
    allowed_python |= {torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not}
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
                if target.namespace == "aten" and target._opname not in _PT2_DENIED_ATEN:
                    continue
            elif node.op == "call_function" and target in allowed_python:
                continue
            raise ModelLoadError(f"{path} graph has a {node.op} of {str(target)[:80]!r}; refused")


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


def _compare_reference(
    wrapped: PixelSpaceModel, reference: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor,
    out: np.ndarray, path: Path, details: dict[str, Any],
) -> None:
    with torch.no_grad():
        normalised = wrapped.normalise(inputs).numpy()
    try:
        expected = reference(normalised)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime failed to run {path}: {_one_line(exc)}") from exc
    if expected.shape != out.shape or not np.isfinite(expected).all():
        raise ModelLoadError(
            f"onnxruntime and the converted model of {path} disagree on output shape or finiteness"
        )
    difference = float(np.abs(expected - out).max())
    tolerance = ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    details["onnx_torch_max_abs_diff"] = difference
    details["onnx_torch_tolerance"] = tolerance
    if difference > tolerance:
        raise ModelLoadError(
            f"onnx2torch conversion of {path} disagrees with onnxruntime: max logit difference "
            f"{difference:.3g} > {tolerance:.3g}"
        )
