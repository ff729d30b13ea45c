"""Fashion-MNIST from gzip IDX files (Debian package `dataset-fashion-mnist`).

IDX format: big-endian magic (0x00000803 images, 0x00000801 labels), then one uint32 per
dimension, then uint8 data. Sizes are checked against the header before anything is trusted.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from scanner.data import CleanData
from scanner.errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    """Where the IDX files live: $TROJANSCAN_FASHION_MNIST_DIR or the Debian location."""
    return Path(os.environ.get("TROJANSCAN_FASHION_MNIST_DIR", DEFAULT_DIR))


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one gzip IDX file into a uint8 array shaped as its header says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"IDX file not found: {path} (install it: apt-get install dataset-fashion-mnist)"
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected_bytes = int(np.prod(dims))
    if len(raw) - header_end != expected_bytes:
        raise DataError(
            f"{path}: header says {dims} ({expected_bytes} bytes) "
            f"but the file holds {len(raw) - header_end} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def load_fashion_mnist(split: str = "train", directory: str | Path | None = None) -> CleanData:
    """Load a split ('train' or 'test') as CleanData: x (N, 1, 28, 28) in [0, 1], y int64."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = Path(directory) if directory is not None else data_dir()
    images_name, labels_name = _FILES[split]
    images = read_idx(directory / images_name, IMAGES_MAGIC)
    labels = read_idx(directory / labels_name, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return CleanData(x, labels.astype(np.int64))
