import numpy as np
import pytest

from scanner.data import CleanData
from scanner.errors import DataError


def images(n: int = 4, c: int = 1, hw: int = 8) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, c, hw, hw)).astype(np.float32)


def labels(n: int = 4) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 3


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (images().astype(np.float64), labels(), "float32"),
        (images()[0], labels(), "rank 4"),
        (images(c=2), labels(), "1 or 3 channels"),
        (images()[:0], labels()[:0], "empty"),
        (np.where(np.eye(8, dtype=bool), np.nan, images()).astype(np.float32), labels(), "NaN"),
        (images() * 255, labels(), r"\[0, 1\]"),
        (images(), labels().astype(np.int32), "int64"),
        (images(), labels(3), "shape"),
        (images(), -labels() - 1, ">= 0"),
    ],
)
def test_bad_clean_data_is_rejected_with_one_line(x, y, message):
    with pytest.raises(DataError, match=message) as caught:
        CleanData(x, y)
    assert "\n" not in str(caught.value)


def test_labels_outside_the_models_classes_are_rejected():
    data = CleanData(images(), labels())
    data.check_fits(num_classes=3, image_shape=(1, 8, 8))
    with pytest.raises(DataError, match="only 2 classes"):
        data.check_fits(num_classes=2)
    with pytest.raises(DataError, match="expects"):
        data.check_fits(num_classes=3, image_shape=(3, 8, 8))
    with pytest.raises(DataError, match="at least 5 per class"):
        data.check_fits(num_classes=3, min_per_class=5)


def test_npz_round_trip(tmp_path):
    data = CleanData(images(6, 3), labels(6))
    data.save_npz(tmp_path / "clean.npz")
    loaded = CleanData.load_npz(tmp_path / "clean.npz")
    np.testing.assert_array_equal(loaded.x, data.x)
    np.testing.assert_array_equal(loaded.y, data.y)
    assert CleanData.from_bytes((tmp_path / "clean.npz").read_bytes()).image_shape == (3, 8, 8)


def test_unreadable_npz_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CleanData.load_npz(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        CleanData.load_npz(tmp_path / "garbage.npz")
    np.savez(tmp_path / "only_x.npz", x=images())
    with pytest.raises(DataError, match=r"lacks array\(s\) \['y'\]"):
        CleanData.load_npz(tmp_path / "only_x.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([object()], dtype=object), y=labels(1))
    with pytest.raises(DataError):
        CleanData.load_npz(tmp_path / "objects.npz")  # object arrays would need unpickling
