"""Tests of the synthetic traffic-sign generator (scanner.signs). Fast: no training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanner import signs
from scanner.signs import IMAGE_SIZE, NUM_CLASSES, class_design, make_signs, render_signs


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small batches render faster on one thread, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_set() -> tuple[np.ndarray, np.ndarray]:
    return make_signs(n_per_class=3, seed=0)


@pytest.fixture(scope="module")
def paired_renders() -> np.ndarray:
    """(43, 8, 3, 32, 32): every class rendered with the same seed, hence the same nuisance."""
    return np.stack([render_signs(np.full(8, k), seed=3) for k in range(NUM_CLASSES)])


def test_make_signs_shapes_dtypes_and_range(small_set):
    x, y = small_set
    assert x.shape == (NUM_CLASSES * 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert x.dtype == np.float32
    assert y.shape == (NUM_CLASSES * 3,)
    assert y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.isfinite(x).all()


def test_make_signs_is_balanced_and_shuffled(small_set):
    _, y = small_set
    assert y.min() == 0 and y.max() == NUM_CLASSES - 1
    np.testing.assert_array_equal(np.bincount(y, minlength=NUM_CLASSES), 3)
    assert not np.all(np.diff(y) >= 0), "labels should be shuffled, not sorted"


def test_make_signs_is_deterministic_per_seed(small_set):
    x, y = small_set
    x_again, y_again = make_signs(n_per_class=3, seed=0)
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(y, y_again)
    x_other, y_other = make_signs(n_per_class=3, seed=1)
    assert not np.array_equal(y, y_other)
    assert np.abs(x - x_other).mean() > 0.05


def test_render_signs_is_deterministic_per_seed():
    labels = np.arange(NUM_CLASSES)
    first = render_signs(labels, seed=7)
    np.testing.assert_array_equal(first, render_signs(labels, seed=7))
    assert np.abs(first - render_signs(labels, seed=8)).mean() > 0.05


def test_nuisance_does_not_depend_on_labels():
    a = np.array([0, 5, 12, 30, 42, 7])
    b = np.array([0, 6, 12, 31, 42, 8])
    xa, xb = render_signs(a, seed=11), render_signs(b, seed=11)
    same = a == b
    np.testing.assert_array_equal(xa[same], xb[same])
    assert (np.abs(xa[~same] - xb[~same]).mean(axis=(1, 2, 3)) > 0.005).all()


def test_images_of_one_class_vary(paired_renders):
    # Realistic nuisance: background, pose and lighting differ between images of a class.
    per_pixel_std = paired_renders.std(axis=1).mean()
    assert per_pixel_std > 0.1


def test_render_signs_handles_batches_larger_than_one_chunk():
    labels = np.arange(signs._BATCH + 5) % NUM_CLASSES
    x = render_signs(labels, seed=0)
    assert x.shape == (len(labels), 3, IMAGE_SIZE, IMAGE_SIZE)
    # The last chunk gets fresh randomness, not a copy of the first chunk.
    assert not np.array_equal(x[:5], x[-5:])


def test_render_signs_empty():
    assert render_signs(np.array([], dtype=np.int64), seed=0).shape == (0, 3, 32, 32)


@pytest.mark.parametrize(
    "labels", [np.array([0, 43]), np.array([-1]), np.array([[0, 1]]), np.array([0.5])]
)
def test_render_signs_rejects_bad_labels(labels):
    with pytest.raises(ValueError):
        render_signs(labels, seed=0)


@pytest.mark.parametrize("label", [-1, NUM_CLASSES])
def test_class_design_rejects_out_of_range(label):
    with pytest.raises(ValueError):
        class_design(label)


def test_class_designs_are_distinct_and_valid():
    designs = [class_design(k) for k in range(NUM_CLASSES)]
    keys = {(d.shape, d.fill, d.border, d.glyph) for d in designs}
    assert len(keys) == NUM_CLASSES
    for d in designs:
        assert d.shape in signs.SHAPES
        assert d.glyph in signs.GLYPHS
        assert {d.fill, d.border, d.ink} <= set(signs.COLOURS)
        assert d.fill != d.border, f"{d}: border invisible"
        assert d.glyph == "none" or d.ink != d.fill, f"{d}: glyph invisible"


def test_class_design_is_fixed():
    assert class_design(0) == class_design(0)
    with pytest.raises(AttributeError):
        class_design(0).shape = "square"  # type: ignore[misc]


def test_templates_are_valid_rgba_and_pairwise_distinct():
    templates = np.stack([signs.class_template(k) for k in range(NUM_CLASSES)])
    assert templates.shape == (NUM_CLASSES, 4, 64, 64)
    assert templates.min() >= 0.0 and templates.max() <= 1.0
    assert (templates[:, :3] <= templates[:, 3:] + 1e-6).all(), "RGB must be premultiplied"
    # The sign covers most of its template.
    assert (templates[:, 3].mean(axis=(1, 2)) > 0.4).all()
    diff = np.abs(templates[:, None] - templates[None]).mean(axis=(2, 3, 4))
    np.fill_diagonal(diff, np.inf)
    assert diff.min() > 0.005


def test_classes_differ_under_identical_nuisance(paired_renders):
    # Same seed and length: identical backgrounds, poses and noise; only the sign differs.
    class_means = paired_renders.mean(axis=1)
    diff = np.abs(class_means[:, None] - class_means[None]).mean(axis=(2, 3, 4))
    np.fill_diagonal(diff, np.inf)
    assert diff.min() > 0.002
    # And every single image pair differs, not just the averages.
    per_image = np.abs(paired_renders[:, None] - paired_renders[None]).mean(axis=(3, 4, 5))
    per_image[np.arange(NUM_CLASSES), np.arange(NUM_CLASSES)] = np.inf
    assert per_image.min() > 0.0005


# Colour contrasts (channel weights) that a sign of each fill colour must push up.
_FILL_CONTRASTS = {
    "blue": (-1.0, 0.0, 1.0),  # blue minus red
    "red": (1.0, -0.5, -0.5),  # red minus green and blue
    "yellow": (0.5, 0.5, -1.0),  # red and green minus blue
    "green": (-0.5, 1.0, -0.5),  # green minus red and blue
}


def test_sign_fill_colour_shows_in_the_images(paired_renders):
    # Under identical nuisance, a class's mean colour leans towards its fill colour.
    mean_colour = paired_renders.mean(axis=(1, 3, 4))  # (43, RGB)
    for k in range(NUM_CLASSES):
        fill = class_design(k).fill
        if fill in _FILL_CONTRASTS:
            contrast = mean_colour[k] @ np.array(_FILL_CONTRASTS[fill])
            assert contrast > 0.08, f"class {k} ({fill} fill): contrast {contrast:.3f}"
