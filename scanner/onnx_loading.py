"""ONNX loading: parse, check and convert an ONNX model to a differentiable torch module.

An ONNX file is a protobuf `onnx` parses and `onnx.checker` accepts. It is converted to torch with
onnx2torch so detectors get input gradients; onnxruntime runs the original file on a check batch
and the two must agree (`_compare_reference`), so a conversion bug can never silently change what
is scanned.

Untrusted input (tests/test_fuzz_models.py mutates files by the thousand): before anything is
converted, strict shape inference must agree with every declared shape and no tensor may exceed
`MAX_TENSOR_ELEMENTS` on the check batch (`_check_onnx_shapes`); external data must be a plain file
beside the model, with each tensor's range inside it and the total within the size limit, all
checked before anything reads it.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from scanner.errors import ModelLoadError
from scanner.loading_common import CHECK_BATCH, MAX_TENSOR_ELEMENTS, _Loaded, _one_line

if TYPE_CHECKING:  # annotation only: model_io imports this module
    from scanner.model_io import PixelSpaceModel

ONNX_TOLERANCE = 1e-3  # absolute on logits, scaled by max(1, largest |logit|)


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


def _load_onnx(raw: bytes, model: Any, path: Path, max_nodes: int) -> _Loaded:
    import onnx

    graph = model.graph
    nodes = _count_onnx_nodes(graph)
    if nodes > max_nodes:
        raise ModelLoadError(f"ONNX model {path} has {nodes} nodes, over the limit of {max_nodes}")
    if _onnx_uses_external_data(graph):  # model_io embeds them before this point
        raise ModelLoadError(f"ONNX model {path} still refers to external data files")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several checker/validation error types
        raise ModelLoadError(f"ONNX model {path} is invalid: {_one_line(exc)}") from exc

    _check_onnx_shapes(model, path)
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


def _check_onnx_shapes(model: Any, path: Path) -> None:
    """Before anything is converted or allocated: strict shape inference (constants propagated)
    must agree with every shape the file declares, and no tensor may exceed MAX_TENSOR_ELEMENTS on
    the check batch. A symbolic dimension counts as the check batch size."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError, or a protobuf error on odd fields
        raise ModelLoadError(f"ONNX model {path} has inconsistent shapes or types: {_one_line(exc)}") from exc
    graph = inferred.graph
    shapes = [(t.name, list(t.dims), False) for t in graph.initializer]
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes.append((info.name, [d.dim_value if d.HasField("dim_value") else None for d in dims], True))
    for name, dims, symbolic_is_batch in shapes:
        elements = 1
        for dim in dims:
            elements *= CHECK_BATCH if dim is None and symbolic_is_batch else max(int(dim or 0), 0)
        if elements > MAX_TENSOR_ELEMENTS:
            raise ModelLoadError(f"ONNX model {path}: tensor {name[:60]!r} would hold {elements} elements on "
                                 f"{CHECK_BATCH} images, over the limit of {MAX_TENSOR_ELEMENTS}")


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


def external_data_files(model: Any, path: Path, max_bytes: int | None = None) -> list[Path]:
    """The external tensor files an ONNX model refers to (MLflow saves ONNX models this way by
    default). Each must be a plain file name in the model's own folder: a location with a folder
    part or `..` could read any file on the scanning machine, so it is refused. Each tensor's
    offset and length must lie inside its file, and (with `max_bytes`) the files together must be
    within the limit, all checked before anything reads them (the digest reads them first)."""
    import onnx

    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        fields = {e.key: e.value for e in tensor.external_data}
        location = fields.get("location", "")
        if not location or Path(location).name != location or location in (".", "..") or "\0" in location:
            raise ModelLoadError(f"ONNX model {path}: external data location {location[:80]!r} is not a file "
                                 "name beside the model; refused")
        file = path.parent / location
        if not file.is_file() or file.is_symlink():
            raise ModelLoadError(f"ONNX model {path}: external data file {location} is missing")
        _check_external_range(fields, file.stat().st_size, tensor.name, path)
        files.add(file)
    if max_bytes is not None:
        total = sum(file.stat().st_size for file in files)
        if total > max_bytes:
            raise ModelLoadError(f"ONNX model {path}: external data is {total} bytes, over the limit of {max_bytes}")
    return sorted(files)


def _check_external_range(fields: dict[str, str], file_size: int, tensor: str, path: Path) -> None:
    """offset/length must be plain non-negative integers inside the file (onnx would otherwise
    seek anywhere or ask for a buffer of the declared length)."""
    try:
        offset = int(fields.get("offset", "0"))
        length = int(fields["length"]) if "length" in fields else file_size - offset
    except ValueError:
        offset = length = -1
    if offset < 0 or length < 0 or offset + length > file_size:
        raise ModelLoadError(f"ONNX model {path}: external data of tensor {tensor[:60]!r} (offset "
                             f"{fields.get('offset', '0')[:20]}, length {fields.get('length', '-')[:20]}) lies outside "
                             f"its {file_size}-byte file; refused")


def embed_external_data(model: Any, path: Path, files: list[Path], max_bytes: int) -> None:
    """Read the external tensors into the model (sizes checked first) so the rest of the loader
    sees a self-contained model."""
    from onnx.external_data_helper import load_external_data_for_model

    total = sum(file.stat().st_size for file in files)
    if total > max_bytes:
        raise ModelLoadError(f"ONNX model {path}: external data is {total} bytes, over the limit of {max_bytes}")
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"ONNX model {path}: cannot read its external data: {_one_line(exc)}") from exc


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
