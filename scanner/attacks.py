"""BadNets-style trojan attacks, for self-test and benchmarks only (never applied to users' models).

A trigger is a (mask, pattern) pair in pixel space plus a blend ratio alpha:
    x' = (1 - alpha * m) * x + alpha * m * p
with m in [0, 1] of shape (h, w) and p in [0, 1] of shape (C, h, w). The same objects give
the poisoned training images and the ground-truth masks that restored triggers are judged
against, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scanner.data import CleanData

Shape = Literal["square", "checkerboard", "blob", "watermark"]
Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left", "centre", "random"]
MARGIN = 1  # pixels between a corner trigger and the image border


class TriggerSpec(BaseModel):
    """How one trigger looks and where it goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: Shape = "square"
    size: int = Field(4, ge=1, le=64, description="side of the trigger's bounding box, pixels")
    position: Corner | tuple[int, int] = Field(
        "bottom-right", description="a corner, 'centre', 'random' per image, or (row, col)"
    )
    alpha: float = Field(1.0, gt=0.0, le=1.0, description="blend ratio; < 1 is a blended trigger")
    colour: tuple[float, ...] = Field((1.0,), description="pattern colour, one value or one per channel")
    seed: int = Field(0, description="seed of the blob's outline")


class AttackSpec(BaseModel):
    """One or more triggers, each with its target label, and the share of poisoned images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    triggers: tuple[TriggerSpec, ...] = Field(min_length=1)
    targets: tuple[int, ...] = Field(min_length=1, description="target label of each trigger")
    poison_rate: float = Field(0.1, gt=0.0, lt=1.0, description="share of training images poisoned")

    @model_validator(mode="after")
    def _one_target_per_trigger(self) -> AttackSpec:
        if len(self.targets) != len(self.triggers):
            raise ValueError(f"{len(self.triggers)} triggers but {len(self.targets)} targets")
        return self

    @property
    def target_classes(self) -> list[int]:
        return sorted(set(self.targets))


@dataclass(frozen=True)
class Trigger:
    """A trigger patch: mask (h, w) and pattern (C, h, w), both float32 in [0, 1]."""

    mask: np.ndarray
    pattern: np.ndarray
    alpha: float
    spec: TriggerSpec

    @property
    def size(self) -> int:
        return self.mask.shape[0]


def build_trigger(spec: TriggerSpec, channels: int) -> Trigger:
    """Draw the mask and pattern a spec describes, for images with `channels` channels."""
    s = spec.size
    colour = np.asarray(spec.colour, dtype=np.float32)
    if colour.size == 1:
        colour = np.repeat(colour, channels)
    if colour.size != channels:
        raise ValueError(f"trigger colour has {colour.size} values for {channels} channels")
    solid = np.broadcast_to(colour[:, None, None], (channels, s, s)).astype(np.float32)
    if spec.shape == "square":
        mask, pattern = np.ones((s, s), np.float32), solid
    elif spec.shape == "checkerboard":
        checks = ((np.add.outer(np.arange(s), np.arange(s)) % 2) == 0).astype(np.float32)
        mask, pattern = np.ones((s, s), np.float32), solid * checks[None]
    elif spec.shape == "blob":
        mask, pattern = _blob_mask(s, spec.seed), solid
    elif spec.shape == "watermark":
        mask, pattern = _watermark_mask(s), solid
    else:  # pragma: no cover - pydantic rejects other shapes
        raise ValueError(spec.shape)
    return Trigger(mask=mask, pattern=np.ascontiguousarray(pattern), alpha=spec.alpha, spec=spec)


def _blob_mask(size: int, seed: int) -> np.ndarray:
    """An irregular connected blob filling about 60% of its box (random radius per angle)."""
    rng = np.random.default_rng(seed)
    centre = (size - 1) / 2.0
    rows, cols = np.mgrid[0:size, 0:size]
    angle = np.arctan2(rows - centre, cols - centre)
    radius = np.hypot(rows - centre, cols - centre)
    # A smooth random outline: a few low-frequency harmonics around a base radius.
    outline = np.full_like(angle, 0.5 * size * 0.85)
    for k in (2, 3, 5):
        outline += 0.5 * size * 0.2 * rng.uniform(-1, 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    mask = (radius <= outline).astype(np.float32)
    mask[int(centre), int(centre)] = 1.0  # never empty, always connected through the centre
    return mask


def _watermark_mask(size: int) -> np.ndarray:
    """Thin strokes spread over a large box: a frame and both diagonals, like a stamped mark."""
    mask = np.zeros((size, size), np.float32)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    idx = np.arange(size)
    mask[idx, idx] = 1.0
    mask[idx, size - 1 - idx] = 1.0
    return mask


def corner_offset(position: Corner | tuple[int, int], size: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left (row, col) of a fixed-position trigger of side `size` in an image of `image_hw`."""
    height, width = image_hw
    if isinstance(position, tuple):
        row, col = position
    elif position == "bottom-right":
        row, col = height - size - MARGIN, width - size - MARGIN
    elif position == "bottom-left":
        row, col = height - size - MARGIN, MARGIN
    elif position == "top-right":
        row, col = MARGIN, width - size - MARGIN
    elif position == "top-left":
        row, col = MARGIN, MARGIN
    elif position == "centre":
        row, col = (height - size) // 2, (width - size) // 2
    else:
        raise ValueError(f"position {position!r} has no fixed offset")
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"trigger of size {size} at {(row, col)} does not fit a {image_hw} image")
    return int(row), int(col)


def offsets_for(trigger: Trigger, n: int, image_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(n, 2) top-left offsets: the same fixed one n times, or one uniform draw per image."""
    size = trigger.size
    if trigger.spec.position == "random":
        rows = rng.integers(0, image_hw[0] - size + 1, n)
        cols = rng.integers(0, image_hw[1] - size + 1, n)
        return np.stack([rows, cols], axis=1)
    return np.tile(np.array(corner_offset(trigger.spec.position, size, image_hw)), (n, 1))


def stamp(x: np.ndarray, trigger: Trigger, offsets: np.ndarray) -> np.ndarray:
    """Return a copy of images x (N, C, H, W) with the trigger blended in at each image's offset."""
    out = x.copy()
    m = trigger.alpha * trigger.mask[None]  # (1, h, w)
    s = trigger.size
    for i, (row, col) in enumerate(offsets):
        window = out[i, :, row:row + s, col:col + s]
        out[i, :, row:row + s, col:col + s] = (1.0 - m) * window + m * trigger.pattern
    return out


def full_mask(trigger: Trigger, image_hw: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask (H, W) of a fixed-position trigger: its mask pasted at its offset.

    A random-position trigger has no fixed ground truth in image coordinates; callers get the
    patch mask (`trigger.mask`) instead and compare it by best alignment.
    """
    row, col = corner_offset(trigger.spec.position, trigger.size, image_hw)
    out = np.zeros(image_hw, np.float32)
    out[row:row + trigger.size, col:col + trigger.size] = trigger.mask
    return out


def build_triggers(attack: AttackSpec, channels: int) -> list[Trigger]:
    return [build_trigger(spec, channels) for spec in attack.triggers]


def poison(data: CleanData, attack: AttackSpec, seed: int) -> tuple[CleanData, np.ndarray]:
    """BadNets poisoning: stamp `poison_rate` of the images (none already of the trigger's
    target) and relabel them to the target. The share is split evenly between triggers.

    Returns the poisoned data set (same size, same order) and the indices that were poisoned.
    """
    rng = np.random.default_rng(seed)
    triggers = build_triggers(attack, data.x.shape[1])
    x, y = data.x.copy(), data.y.copy()
    n_total = int(round(attack.poison_rate * len(data)))
    per_trigger = np.full(len(triggers), n_total // len(triggers))
    per_trigger[: n_total % len(triggers)] += 1
    taken = np.zeros(len(data), bool)
    poisoned = []
    for trigger, target, count in zip(triggers, attack.targets, per_trigger):
        candidates = np.flatnonzero((data.y != target) & ~taken)
        chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
        offsets = offsets_for(trigger, len(chosen), data.x.shape[2:], rng)
        x[chosen] = stamp(x[chosen], trigger, offsets)
        y[chosen] = target
        taken[chosen] = True
        poisoned.append(chosen)
    return CleanData(x, y), np.sort(np.concatenate(poisoned))


def triggered_set(data: CleanData, trigger: Trigger, target: int, seed: int) -> CleanData:
    """Every image not of the target class, stamped with the trigger and labelled with the target:
    the set on which attack success rate (ASR) is measured."""
    keep = data.y != target
    x = data.x[keep]
    offsets = offsets_for(trigger, len(x), data.x.shape[2:], np.random.default_rng(seed))
    return CleanData(stamp(x, trigger, offsets), np.full(len(x), target, np.int64))
