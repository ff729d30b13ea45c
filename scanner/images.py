"""PNG encoding of masks, patterns, stamped images and heatmaps (Pillow), for artifacts and the report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def to_png_bytes(image: np.ndarray, scale: int = 4) -> bytes:
    """Encode an (H, W) or (C, H, W) array in [0, 1] as PNG, enlarged `scale` times (nearest)."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    pixels = (np.clip(np.nan_to_num(array), 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | Path, scale: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png_bytes(image, scale))
    return path


def normalise_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Scale a non-negative heatmap to [0, 1] for display."""
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    return heatmap / peak if peak > 0 else np.zeros_like(heatmap)
