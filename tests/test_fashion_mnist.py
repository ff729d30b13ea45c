import gzip
import struct

import numpy as np
import pytest

from scanner.errors import DataError
from scanner.fashion_mnist import IMAGES_MAGIC, LABELS_MAGIC, load_fashion_mnist, read_idx


def test_real_fashion_mnist_files_load():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert np.bincount(train.y).tolist() == [6000] * 10
    assert np.bincount(test.y).tolist() == [1000] * 10
    assert 0.0 <= train.x.min() and train.x.max() == 1.0
    assert train.x.mean() == pytest.approx(0.286, abs=0.01)  # Fashion-MNIST's known pixel mean


def write_idx(path, magic, dims, payload: bytes):
    path.write_bytes(gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + payload))


def test_idx_reader_checks_magic_and_size(tmp_path):
    write_idx(tmp_path / "ok.gz", IMAGES_MAGIC, (2, 3, 3), bytes(range(18)))
    assert read_idx(tmp_path / "ok.gz", IMAGES_MAGIC).shape == (2, 3, 3)
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "ok.gz", LABELS_MAGIC)
    write_idx(tmp_path / "short.gz", IMAGES_MAGIC, (2, 3, 3), bytes(17))
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "short.gz", IMAGES_MAGIC)
    (tmp_path / "plain").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "plain", IMAGES_MAGIC)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent.gz", IMAGES_MAGIC)
