"""Export trained models to ONNX (legacy exporter, dynamic batch) and torch.export `.pt2`,
and check that an exported ONNX file computes what the torch model computes."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int]) -> Path:
    """Write `model` as ONNX with the legacy TorchScript exporter: the dynamo exporter needs
    onnxscript and its output (Reshape allowzero=1) is rejected by onnx2torch."""
    path = Path(path)
    example = torch.zeros((2, *input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def export_pt2(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int]) -> Path:
    """Write `model` as a torch.export program with a dynamic batch dimension.

    The example batch is 2: torch.export specialises a dimension of size 1 to a constant.
    """
    path = Path(path)
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def onnx_logits(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX file on the CPU with onnxruntime (the CUDA provider is never asked for)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


@torch.no_grad()
def max_logit_difference(model: nn.Module, onnx_path: str | Path, x: np.ndarray) -> float:
    """Largest absolute difference between torch and onnxruntime logits on images x
    (the torch model must be in eval mode)."""
    expected = model(torch.from_numpy(x)).numpy()
    return float(np.abs(expected - onnx_logits(onnx_path, x)).max())
