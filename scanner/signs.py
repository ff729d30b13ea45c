"""Synthetic traffic signs: a deterministic, GTSRB-like stand-in of 43 classes at 32x32 RGB.

No real sign data can be downloaded here, so each class is a fixed design (outline shape,
fill colour, border colour, glyph), drawn once as a high-resolution RGBA template. Every
image then places its class template on a random background with a random affine warp
(scale, small rotation, shift) and random photometric nuisance (colour cast, contrast,
brightness, Gaussian noise). Everything runs in torch batches; signs are warped at twice
the output resolution and 2x2 average-pooled, which anti-aliases their edges.

All randomness comes from a numpy generator seeded by `seed`, and the nuisance of image i
depends only on (seed, i, number of images), never on the labels: rendering two label
arrays of equal length with the same seed gives the same backgrounds and poses, so the
images differ only in their signs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

NUM_CLASSES = 43
IMAGE_SIZE = 32

_RENDER_SIZE = 2 * IMAGE_SIZE  # signs are warped here, then 2x2 average-pooled
_TEMPLATE_SIZE = 64  # template resolution used by the warp
_DRAW_SIZE = 256  # resolution templates are drawn at before anti-aliased downsizing
_BATCH = 1024

# Nuisance ranges.
SCALE_RANGE = (0.6, 1.0)  # sign diameter as a fraction of the image side
MAX_ROTATION_DEG = 15.0
MAX_EXTRA_SHIFT = 0.05  # how far (in half-image units) a sign may poke out of the frame
CONTRAST_RANGE = (0.6, 1.3)
BRIGHTNESS_RANGE = (-0.2, 0.2)
COLOUR_CAST = 0.1  # per-channel gain in 1 +- this
SIGN_FADE_MAX = 0.25  # sign colours are blended towards grey by up to this much
NOISE_STD_MAX = 0.06
CLUTTER_ITEMS = 4  # background rectangles/ellipses per image, each present with p = 1/2

Colour = tuple[int, int, int]
COLOURS: dict[str, Colour] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "red": (200, 25, 30),
    "blue": (20, 70, 190),
    "yellow": (250, 200, 20),
    "green": (20, 140, 60),
}

SHAPES = ("circle", "triangle_up", "triangle_down", "octagon", "diamond", "square")
GLYPHS = (
    "none", "hbar", "vbar", "plus", "cross", "dot", "ring", "two_dots", "bars3", "slash",
    "zigzag", "box", "chevron", "arrow_up", "arrow_left", "arrow_right",
)


@dataclass(frozen=True)
class SignDesign:
    """How one class looks: outline shape, fill and border colours, glyph and its ink colour."""

    shape: str
    fill: str
    border: str
    glyph: str
    ink: str


# Sign families, GTSRB-like: (shape, fill, border, ink, glyphs). Class labels enumerate the
# families in order and, within a family, its glyphs in order: 6+6+6+5+5+5+5+5 = 43.
_FAMILIES: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("circle", "white", "red", "black", ("none", "slash", "two_dots", "zigzag", "box", "bars3")),
    ("circle", "blue", "white", "white",
     ("arrow_up", "arrow_left", "arrow_right", "ring", "dot", "plus")),
    ("triangle_up", "white", "red", "black",
     ("vbar", "cross", "chevron", "zigzag", "two_dots", "arrow_up")),
    ("triangle_down", "white", "red", "black", ("none", "dot", "hbar", "vbar", "cross")),
    ("octagon", "red", "white", "white", ("hbar", "none", "plus", "bars3", "ring")),
    ("diamond", "yellow", "white", "black", ("none", "dot", "ring", "cross", "box")),
    ("square", "green", "white", "white",
     ("arrow_up", "arrow_left", "arrow_right", "plus", "hbar")),
    ("circle", "white", "black", "black", ("slash", "none", "cross", "dot", "vbar")),
)

_DESIGNS: tuple[SignDesign, ...] = tuple(
    SignDesign(shape, fill, border, glyph, ink)
    for shape, fill, border, ink, glyphs in _FAMILIES
    for glyph in glyphs
)
assert len(_DESIGNS) == NUM_CLASSES


def class_design(label: int) -> SignDesign:
    """The fixed design of class `label` (0..42)."""
    _check_label(int(label))
    return _DESIGNS[int(label)]


# ----------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------

Point = tuple[float, float]


def _polygon(n: int, radius: float, start_deg: float, centre: Point = (0.5, 0.5)) -> list[Point]:
    """Vertices of a regular n-gon in unit coordinates (y grows downwards)."""
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return [(centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)) for a in angles]


def _outline(shape: str) -> tuple[list[Point] | None, Point, float]:
    """Outer outline of a shape: polygon (None for the circle), inner centre, inner radius.

    The inner centre and radius describe where the glyph fits and where the border is
    shrunk towards.
    """
    if shape == "circle":
        return None, (0.5, 0.5), 0.48
    if shape == "octagon":
        return _polygon(8, 0.49, 22.5), (0.5, 0.5), 0.45
    if shape == "diamond":
        return _polygon(4, 0.49, -90.0), (0.5, 0.5), 0.49 / np.sqrt(2)
    if shape == "square":
        return _polygon(4, 0.46 * np.sqrt(2), 45.0), (0.5, 0.5), 0.46
    if shape in ("triangle_up", "triangle_down"):
        # Equilateral triangle with side 0.98, centred on its incentre.
        side = 0.98
        height = side * np.sqrt(3) / 2
        inradius = height / 3
        top, bottom = 0.5 - height / 2, 0.5 + height / 2
        if shape == "triangle_up":
            points = [(0.5, top), (0.5 - side / 2, bottom), (0.5 + side / 2, bottom)]
            centre = (0.5, bottom - inradius)
        else:
            points = [(0.5, bottom), (0.5 - side / 2, top), (0.5 + side / 2, top)]
            centre = (0.5, top + inradius)
        return points, centre, inradius
    raise ValueError(f"unknown shape {shape!r}")


def _shrink(points: list[Point], centre: Point, factor: float) -> list[Point]:
    return [(centre[0] + factor * (x - centre[0]), centre[1] + factor * (y - centre[1]))
            for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, design: SignDesign) -> tuple[Point, float]:
    """Draw the filled shape with its border; return where the glyph goes (centre, half-size)."""
    points, centre, inradius = _outline(design.shape)
    border_width = 0.07 if design.shape.startswith("triangle") else 0.09
    inner = (inradius - border_width) / inradius
    border, fill = COLOURS[design.border], COLOURS[design.fill]
    s = _DRAW_SIZE
    if points is None:
        r_out, r_in = inradius, inradius - border_width
        draw.ellipse(_box(centre, r_out, s), fill=border)
        draw.ellipse(_box(centre, r_in, s), fill=fill)
        return centre, 0.68 * r_in
    draw.polygon([(x * s, y * s) for x, y in points], fill=border)
    draw.polygon([(x * s, y * s) for x, y in _shrink(points, centre, inner)], fill=fill)
    glyph_scale = {"diamond": 0.62, "square": 0.72, "octagon": 0.7}.get(design.shape, 0.85)
    return centre, glyph_scale * inradius * inner


def _box(centre: Point, r: float, s: int) -> list[float]:
    return [(centre[0] - r) * s, (centre[1] - r) * s, (centre[0] + r) * s, (centre[1] + r) * s]


def _draw_glyph(
    draw: ImageDraw.ImageDraw, glyph: str, centre: Point, h: float, ink: Colour, paper: Colour
) -> None:
    """Draw a glyph of half-size h (unit coordinates) around centre in colour `ink`.

    `paper` is the sign's fill colour, used to punch holes (the ring).
    """
    s = _DRAW_SIZE
    cx, cy = centre
    w = 0.32 * h  # half stroke width

    def px(points):
        return [(x * s, y * s) for x, y in points]

    def rect(x0, y0, x1, y1):
        draw.rectangle(px([(cx + x0, cy + y0), (cx + x1, cy + y1)]), fill=ink)

    def line(points, width=2 * w):
        draw.line(px([(cx + x, cy + y) for x, y in points]), fill=ink,
                  width=max(1, round(width * s)), joint="curve")

    def disk(x, y, r):
        draw.ellipse(_box((cx + x, cy + y), r, s), fill=ink)

    if glyph == "none":
        return
    if glyph == "hbar":
        rect(-h, -w * 1.2, h, w * 1.2)
    elif glyph == "vbar":
        rect(-w * 1.2, -h, w * 1.2, h)
    elif glyph == "plus":
        rect(-h, -w, h, w)
        rect(-w, -h, w, h)
    elif glyph == "cross":
        d = 0.8 * h
        line([(-d, -d), (d, d)])
        line([(-d, d), (d, -d)])
    elif glyph == "dot":
        disk(0, 0, 0.6 * h)
    elif glyph == "ring":
        disk(0, 0, h)
        draw.ellipse(_box(centre, 0.55 * h, s), fill=paper)
    elif glyph == "two_dots":
        disk(-0.5 * h, 0, 0.42 * h)
        disk(0.5 * h, 0, 0.42 * h)
    elif glyph == "bars3":
        for y in (-0.7 * h, 0.0, 0.7 * h):
            rect(-h, y - 0.7 * w, h, y + 0.7 * w)
    elif glyph == "slash":
        d = 0.9 * h
        line([(-d, d), (d, -d)], width=2.4 * w)
    elif glyph == "zigzag":
        line([(-h, 0.6 * h), (-0.33 * h, -0.6 * h), (0.33 * h, 0.6 * h), (h, -0.6 * h)],
             width=1.6 * w)
    elif glyph == "box":
        rect(-0.8 * h, -0.8 * h, 0.8 * h, -0.8 * h + 1.4 * w)
        rect(-0.8 * h, 0.8 * h - 1.4 * w, 0.8 * h, 0.8 * h)
        rect(-0.8 * h, -0.8 * h, -0.8 * h + 1.4 * w, 0.8 * h)
        rect(0.8 * h - 1.4 * w, -0.8 * h, 0.8 * h, 0.8 * h)
    elif glyph == "chevron":
        line([(-0.9 * h, 0.5 * h), (0, -0.5 * h), (0.9 * h, 0.5 * h)], width=2.2 * w)
    elif glyph in ("arrow_up", "arrow_left", "arrow_right"):
        # An upward arrow, rotated for the other directions.
        shaft = [(-0.8 * w, -0.1 * h), (0.8 * w, -0.1 * h), (0.8 * w, h), (-0.8 * w, h)]
        head = [(0, -h), (-0.8 * h, -0.1 * h), (0.8 * h, -0.1 * h)]
        turn = {"arrow_up": 0, "arrow_left": 1, "arrow_right": 3}[glyph]
        for poly in (shaft, head):
            for _ in range(turn):
                poly = [(y, -x) for x, y in poly]  # rotate 90 degrees counter-clockwise
            draw.polygon(px([(cx + x, cy + y) for x, y in poly]), fill=ink)
    else:
        raise ValueError(f"unknown glyph {glyph!r}")


@functools.lru_cache(maxsize=None)
def class_template(label: int) -> np.ndarray:
    """Clean template of class `label`: float32 (4, 64, 64) RGBA in [0, 1], read-only.

    Drawn at 256x256 with pillow and downsized with a Lanczos filter (anti-aliased edges).
    The sign fills the template; RGB is premultiplied by alpha.
    """
    design = class_design(label)
    image = Image.new("RGBA", (_DRAW_SIZE, _DRAW_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    centre, half_size = _draw_shape(draw, design)
    _draw_glyph(draw, design.glyph, centre, half_size, COLOURS[design.ink], COLOURS[design.fill])
    small = image.resize((_TEMPLATE_SIZE, _TEMPLATE_SIZE), Image.LANCZOS)
    rgba = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    rgba[:3] *= rgba[3:]
    rgba.setflags(write=False)
    return rgba


def _all_templates() -> torch.Tensor:
    """All class templates stacked: (43, 4, 64, 64)."""
    return torch.from_numpy(np.stack([class_template(k) for k in range(NUM_CLASSES)]))


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]):
    """A float32 tensor of uniform draws from rng."""
    return torch.from_numpy(rng.uniform(low, high, shape).astype(np.float32))


def _backgrounds(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Random backgrounds (n, 3, 32, 32): a gradient blended with a blotchy colour field,
    plus a few rectangles and ellipses of random colour (clutter)."""
    size = IMAGE_SIZE
    draw = functools.partial(_uniform, rng)

    gradient, blotches = draw(0.0, 1.0, (n, 3, 2, 2)), draw(0.0, 1.0, (n, 3, 6, 6))
    mix = draw(0.0, 1.0, (n, 1, 1, 1))
    up = functools.partial(F.interpolate, size=(size, size), mode="bilinear",
                           align_corners=True)
    background = (1 - mix) * up(gradient) + mix * up(blotches)

    # Clutter: axis-aligned rectangles or ellipses, each item present with probability 1/2;
    # later items paint over earlier ones.
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    for _ in range(CLUTTER_ITEMS):
        present = draw(0.0, 1.0, (n, 1, 1, 1)) < 0.5
        is_ellipse = draw(0.0, 1.0, (n, 1, 1, 1)) < 0.5
        centre_x, centre_y = draw(-1.0, 1.0, (n, 1, 1, 1)), draw(-1.0, 1.0, (n, 1, 1, 1))
        radius_x, radius_y = draw(0.1, 0.6, (n, 1, 1, 1)), draw(0.1, 0.6, (n, 1, 1, 1))
        colour = draw(0.0, 1.0, (n, 3, 1, 1))
        dx = (coords.view(1, 1, 1, size) - centre_x).abs() / radius_x
        dy = (coords.view(1, 1, size, 1) - centre_y).abs() / radius_y
        inside = torch.where(is_ellipse, dx**2 + dy**2 <= 1, (dx <= 1) & (dy <= 1)) & present
        background = torch.where(inside, colour, background)
    return background


def _warp_grids(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Sampling grids (n, 64, 64, 2) that place a template with random scale, rotation, shift."""
    scale = rng.uniform(*SCALE_RANGE, n)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    max_shift = (1.0 - scale) + MAX_EXTRA_SHIFT
    shift = rng.uniform(-1.0, 1.0, (n, 2)) * max_shift[:, None]
    # Output point p shows template point R(-angle) (p - shift) / scale.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    linear = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)  # (n, 2, 2)
    offset = -np.einsum("nij,nj->ni", linear, shift)
    theta = torch.from_numpy(np.concatenate([linear, offset[..., None]], -1).astype(np.float32))
    return F.affine_grid(theta, [n, 4, _RENDER_SIZE, _RENDER_SIZE], align_corners=False)


def _photometric(rng: np.random.Generator, images: torch.Tensor) -> torch.Tensor:
    """Colour cast, contrast, brightness and Gaussian noise, then clip to [0, 1]."""
    n = images.shape[0]
    draw = functools.partial(_uniform, rng)

    cast = draw(1 - COLOUR_CAST, 1 + COLOUR_CAST, (n, 3, 1, 1))
    contrast = draw(*CONTRAST_RANGE, (n, 1, 1, 1))
    brightness = draw(*BRIGHTNESS_RANGE, (n, 1, 1, 1))
    noise_std = draw(0.0, NOISE_STD_MAX, (n, 1, 1, 1))
    noise = torch.from_numpy(rng.standard_normal(images.shape, dtype=np.float32))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images * cast - mean) * contrast + mean + brightness + noise_std * noise
    return images.clamp_(0.0, 1.0)


def _render_batch(
    rng: np.random.Generator, labels: np.ndarray, templates: torch.Tensor
) -> torch.Tensor:
    """Render one batch: (n, 3, 32, 32). Draws from rng in an order independent of labels."""
    n = len(labels)
    background = _backgrounds(rng, n)
    grids = _warp_grids(rng, n)
    fade = _uniform(rng, 0.0, SIGN_FADE_MAX, (n, 1, 1, 1))
    sign = F.grid_sample(templates[torch.from_numpy(labels)], grids, mode="bilinear",
                         padding_mode="zeros", align_corners=False)
    rgb, alpha = sign[:, :3], sign[:, 3:]
    rgb = (1 - fade) * rgb + fade * 0.5 * alpha  # premultiplied: fade towards grey
    # Pool the premultiplied sign to 32x32 (anti-aliasing), then composite.
    rgb, alpha = (F.avg_pool2d(t, kernel_size=_RENDER_SIZE // IMAGE_SIZE) for t in (rgb, alpha))
    return _photometric(rng, rgb + (1 - alpha) * background)


def render_signs(labels: np.ndarray, seed: int) -> np.ndarray:
    """Render one sign image per label: float32 (N, 3, 32, 32) in [0, 1].

    Deterministic given (labels, seed). The random nuisance (background, pose, photometry,
    noise) of image i does not depend on the labels, only on seed, i and N.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer)
                        or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be integers in 0..{NUM_CLASSES - 1}")
    labels = labels.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    templates = _all_templates()
    out = np.empty((len(labels), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(labels), _BATCH):
            batch = labels[start:start + _BATCH]
            out[start:start + len(batch)] = _render_batch(rng, batch, templates).numpy()
    return out


def make_signs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A balanced, shuffled set: x float32 (43 n, 3, 32, 32) in [0, 1], y int64 (43 n,)."""
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    shuffle_seed, render_seed = np.random.SeedSequence(seed).spawn(2)
    y = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), n_per_class)
    y = np.random.default_rng(shuffle_seed).permutation(y)
    render_seed_int = int(render_seed.generate_state(1, dtype=np.uint64)[0])
    return render_signs(y, render_seed_int), y


def _check_label(label: int) -> None:
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class label {label} out of range 0..{NUM_CLASSES - 1}")
