"""Small pieces shared by the model loaders (`model_io`, `onnx_loading`, `pt2_guard`).

Kept apart so the format loaders can use them without importing `model_io`, which imports them.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn


CHECK_BATCH = 8  # images used to cross-check a loaded model (onnxruntime vs torch, finite logits)
# Largest tensor the load checks let a model compute on the check batch (512 MiB of float32, 64 MiB
# per image: a 64x512x512 activation still fits): shapes are worked out before anything is
# allocated, so a file of a few bytes cannot make the scanner allocate without bound (a huge
# ConstantOfShape, padding or declared dims). At 2**28 a 1 MB file made a worker peak at 2.5 GB.
MAX_TENSOR_ELEMENTS = 2**27


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
    # works out every tensor's shape for an input batch shape without allocating (raises
    # ModelLoadError); run before the first real forward pass
    shape_check: Callable[[tuple[int, ...]], None] | None = None


def _one_line(exc: BaseException) -> str:
    """First line of an exception's message (never a traceback), or its type name."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours some messages
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return "".join(c for c in first if c.isprintable()) or type(exc).__name__


def _zip_root_names(zf: zipfile.ZipFile) -> tuple[str, list[str]]:
    """torch writes every entry under one top-level folder; return it and the relative names."""
    names = zf.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        return "", names
    root = roots.pop()
    return root, [name[len(root) + 1:] for name in names]
