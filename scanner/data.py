"""The clean-data type every detector consumes, with validation and npz storage.

Images are float32 NCHW pixels in [0, 1]; labels are int64. A model that expects normalised
input gets its mean/std applied by the scanner just before each forward pass, so triggers and
restored masks always live in pixel space.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scanner.errors import DataError


@dataclass(frozen=True)
class CleanData:
    """A validated set of clean images and their true labels."""

    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    y: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        _check_images(self.x)
        _check_labels(self.y, len(self.x))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def check_fits(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] | None = None,
        min_per_class: int = 0,
    ) -> None:
        """Reject data that cannot serve a model with `num_classes` outputs and this input shape."""
        if image_shape is not None and self.image_shape != tuple(image_shape):
            raise DataError(
                f"clean data images have shape {self.image_shape} (C, H, W) "
                f"but the model expects {tuple(image_shape)}"
            )
        if self.y.max() >= num_classes:
            raise DataError(
                f"clean data has label {int(self.y.max())} but the model has only "
                f"{num_classes} classes (0..{num_classes - 1})"
            )
        if min_per_class:
            counts = np.bincount(self.y, minlength=num_classes)
            if counts.min() < min_per_class:
                worst = int(counts.argmin())
                raise DataError(
                    f"clean data has {int(counts.min())} images of class {worst}; "
                    f"at least {min_per_class} per class are needed"
                )

    def subset(self, index: np.ndarray | slice) -> CleanData:
        return CleanData(self.x[index], self.y[index])

    def save_npz(self, path: str | Path) -> None:
        np.savez_compressed(path, x=self.x, y=self.y)

    @classmethod
    def load_npz(cls, path: str | Path) -> CleanData:
        """Load `x` and `y` arrays from an npz file (pickled object arrays are refused)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"clean data file not found: {path}")
        return cls.from_bytes(path.read_bytes(), name=str(path))

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "<bytes>") -> CleanData:
        """Parse npz bytes holding `x` (N, C, H, W float32 in [0, 1]) and `y` (N, int64)."""
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                missing = {"x", "y"} - set(npz.files)
                if missing:
                    raise DataError(
                        f"clean data {name} lacks array(s) {sorted(missing)}; "
                        "it needs 'x' (N,C,H,W float32 in [0,1]) and 'y' (N, int64)"
                    )
                return cls(npz["x"], npz["y"])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"clean data {name} is not a readable npz: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_images(x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray):
        raise DataError(f"clean images must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise DataError(f"clean images must be float32 in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4:
        raise DataError(f"clean images must have rank 4 (N, C, H, W), got shape {x.shape}")
    if len(x) == 0:
        raise DataError("clean data is empty")
    if x.shape[1] not in (1, 3):
        raise DataError(f"clean images must have 1 or 3 channels (NCHW), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"clean images contain {int((~np.isfinite(x)).sum())} NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"clean images must lie in [0, 1], found values in [{lo:g}, {hi:g}]")


def _check_labels(y: np.ndarray, n: int) -> None:
    if not isinstance(y, np.ndarray):
        raise DataError(f"clean labels must be a numpy array, got {type(y).__name__}")
    if y.dtype != np.int64:
        raise DataError(f"clean labels must be int64, got dtype {y.dtype}")
    if y.shape != (n,):
        raise DataError(f"clean labels must have shape ({n},) to match the images, got {y.shape}")
    if y.min() < 0:
        raise DataError(f"clean labels must be >= 0, found {int(y.min())}")
