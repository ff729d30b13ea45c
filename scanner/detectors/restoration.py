"""Trigger restoration for every candidate class at once (the engine behind Neural Cleanse,
TABOR and NC++).

Every public implementation optimises one class after another. Here all classes' masks and
patterns are rows of one tensor; a step stamps each active class's trigger on its own
mini-batch of clean images, so one forward/backward pass of `active x batch` images serves
them all. `slots` classes are active at a time (sized to the device's fastest batch); a class
that has converged leaves and the next waiting class takes its slot.

Each class draws its mini-batches from a random stream of its own, derived from (seed, class)
(`class_streams`): which classes share its steps then changes nothing it computes, so the
restored triggers, and the verdict, do not depend on the slots the device probe chose (nor on
whether the cascade restores the class alone). With one shared batch per step they did: the
same model, seed and settings, scanned twice, got slots 4 and 8 from the probe on a busy host
and flagged [6, 8] and [8] (`fm-clean-res-s1`).

Parametrisation (Neural Cleanse): mask = tanh(m) / (2 - eps) + 0.5 (one channel, broadcast over
colour), pattern = tanh(p) / (2 - eps) + 0.5, both in [0, 1]; x' = (1 - mask) * x + mask * pattern.

Cost schedule, per class (Neural Cleanse): the size penalty's cost starts at 0; once the restored
trigger's attack success has been >= `asr_threshold` for `patience` checks, cost = `init_cost`;
then after `patience` checks above the threshold cost *= 2, after `patience` checks below it
cost /= 2**1.5. The best trigger is the one with the smallest mask L1 among those whose
attack success was >= the threshold (not the last one). A class stops after `early_stop_patience`
checks without a 1% improvement once its cost has moved up, or after `max_steps` steps.

Our stopping rule differs from Neural Cleanse's, which also waits for a down move
(`stop_needs_down_move=True` restores it). A down move needs `patience` checks in a row below
the threshold; a trigger whose attack success hovers around 0.99 rarely gets them, so its class
keeps running with no better trigger to find. Measured on eight classes of a 43-class signs
model (two threads): Neural Cleanse's rule 5570 steps (two classes ran 1210 and 1500 steps),
ours 3800 steps, -32%; the best mask L1s agreed to within 5% (target class 6.5 vs 7.1 pixels,
the others 90-152). The best trigger kept is the same kind either way: the smallest that worked.
A "check" is `check_every` mini-batch steps (Neural Cleanse's epoch is ~31 mini-batches; a
shorter period reacts faster and converges in fewer images).

Adam (lr 0.1, betas 0.5/0.9) is applied per row, so a class that joins later starts its own bias
correction; the active classes' parameters and moments are one tensor between changes of the
active set (`_ActiveAdam`). Each step makes one device-to-host transfer (attack hits, mask L1s,
the finiteness check).

Precision (`precision`, default auto): the model may compute in bfloat16 autocast while the
trigger parameters, stamping, losses and Adam stay float32. "auto" takes bfloat16 where the
device has bfloat16 arithmetic (`bf16_native`: CPUs with AVX512-BF16 or AMX, GPUs from Ampere
on) and float32 elsewhere; the attack success reported for each restored trigger is measured in
float32. The choice is in each result's notes ("precision"). It used to be timed at the start of
each scan (bfloat16 when 1.3x faster), but on a shared host the timing went either way from one
scan to the next, and with it the restored triggers: `fm-clean-cnn-s0` was flagged [8] in float32
and passed in bfloat16, same seed and settings. A device now always restores in one precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from scanner.detectors.base import DetectorSettings, Progress
from scanner.errors import TrojanScanError

EPSILON = 1e-7
# extra_terms(x, y, mask, pattern, targets) -> (inputs (B',C,H,W), loss_of): a detector's
# fixed-weight terms; x (A,B,C,H,W) is each active class's clean batch and y (A,B) their true labels. Their images
# ride in the stamped batch's forward pass, and loss_of(their logits) gives the per-class loss (A,).
ExtraTerms = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
]


class RestorationSettings(DetectorSettings):
    batch_size: int = Field(32, ge=1, le=1024, description="clean images per class per step")
    max_steps: int = Field(1500, ge=10, le=100000, description="mini-batch steps per class at most")
    check_every: int = Field(10, ge=1, le=1000, description="steps per schedule check")
    lr: float = Field(0.1, gt=0, le=10, description="Adam learning rate on the tanh parameters")
    init_cost: float = Field(1e-3, gt=0, description="size-penalty cost once the trigger works")
    asr_threshold: float = Field(0.99, gt=0, le=1, description="attack success that counts as working")
    patience: int = Field(5, ge=1, le=100, description="checks before the cost changes")
    early_stop_patience: int = Field(10, ge=1, le=1000, description="checks without improvement before stopping")
    stop_needs_down_move: bool = Field(False, description="Neural Cleanse's rule: stop only after the cost has "
                                       "also moved down once (slower; see the module docstring)")
    slots: int = Field(0, ge=0, le=1000, description="classes optimised together; 0 = sized to the device")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the model's arithmetic while optimising (restoration and pruning): auto takes "
        "bfloat16 where the device has bfloat16 arithmetic (bf16_native), float32 elsewhere")
    min_images_per_class: int = Field(0, ge=0, description="refuse data with fewer clean images of a class")


@dataclass
class RestorationOutcome:
    """Best trigger per class (NaN-free), its L1 and attack success, and the steps it took."""

    masks: np.ndarray  # (K, H, W)
    patterns: np.ndarray  # (K, C, H, W)
    mask_l1: np.ndarray  # (K,)
    attack_success: np.ndarray  # (K,) on the last check period of the best trigger
    steps: np.ndarray  # (K,)
    reached: np.ndarray  # (K,) bool: the threshold was reached at least once
    slots: int
    bf16: bool = False


def to_unit(param: torch.Tensor) -> torch.Tensor:
    """tanh parametrisation onto [0, 1]. Neural Cleanse's tanh / (2 - eps) + 0.5 overshoots [0, 1]
    by about 1e-7 at saturation (dividing by slightly less than 2), so the result is clamped."""
    return (torch.tanh(param) / (2 - EPSILON) + 0.5).clamp(0.0, 1.0)


def from_unit(value: torch.Tensor) -> torch.Tensor:
    return torch.atanh((value - 0.5) * (2 - EPSILON))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Eq. (1) of TABOR / Neural Cleanse for A classes at once: mask (A,1,H,W), pattern (A,C,H,W),
    x either one batch for every class (B,C,H,W) or a batch per class (A,B,C,H,W) -> (A*B, C, H, W)."""
    per_class = x if x.ndim == 5 else x[None]
    stamped = (1 - mask[:, None]) * per_class + (mask * pattern)[:, None]
    return stamped.reshape(-1, *x.shape[-3:])


def class_streams(seed: int, classes: list[int]) -> dict[int, torch.Generator]:
    """A random stream per class, seeded from (seed, class) alone, for the images its trigger is
    optimised on: what one class computes does not depend on the classes that share its steps."""
    return {k: torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            for k in classes}


def class_batches(streams: dict[int, torch.Generator], classes: list[int], count: int, batch_size: int) -> torch.Tensor:
    """Indices of each class's next mini-batch, (len(classes), batch_size), each from its own stream."""
    return torch.stack([torch.randint(0, count, (batch_size,), generator=streams[k]) for k in classes])


def logits_of(model: torch.nn.Module, inputs: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """model(inputs) as float32 logits; with bf16 the model computes under bfloat16 autocast. The
    trigger parameters, the stamping and the losses stay float32: only the model's own layers run
    in bfloat16, whose 8-bit mantissa still resolves 1/256 of a pixel's range."""
    if not bf16:
        return model(inputs)
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16):
        return model(inputs).float()


class _ActiveAdam:
    """Adam on the parameters of the classes being optimised, kept as one leaf tensor (A, ...)
    with per-row state, so each class has its own step count.

    Classes join with their initial parameters and fresh state and leave for good, so rows are
    gathered only when the active set changes, never written back: indexing a whole table's
    parameters and moments on every step cost more per step than the update itself."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.5, 0.9)) -> None:
        self.lr, (self.b1, self.b2) = lr, betas
        self.param: torch.Tensor | None = None
        self.m = self.v = self.t = torch.zeros(0)

    def regroup(self, keep: list[int], joining: torch.Tensor) -> torch.Tensor:
        """Keep the rows at slot indices `keep` (in that order), append `joining` (initial
        values, fresh state); returns the new leaf parameter."""
        fresh = torch.zeros_like(joining)
        if self.param is None:  # nothing to keep yet: empty rows of the joiners' shape
            self.param, self.m, self.v, self.t = joining[:0], fresh[:0], fresh[:0], fresh.new_zeros(0)
        rows = torch.tensor(keep, dtype=torch.long, device=joining.device)
        self.param = torch.cat([self.param.detach()[rows], joining])
        self.m, self.v = torch.cat([self.m[rows], fresh]), torch.cat([self.v[rows], fresh])
        self.t = torch.cat([self.t[rows], fresh.new_zeros(len(joining))])
        self.param.requires_grad_(True)
        return self.param

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        assert self.param is not None
        self.t += 1
        t = self.t.view(-1, *[1] * (grad.dim() - 1))
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1 ** t)
        v_hat = self.v / (1 - self.b2 ** t)
        self.param -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)


class _Schedule:
    """Neural Cleanse's cost schedule and best-trigger bookkeeping, vectorised over classes."""

    def __init__(self, k: int, s: RestorationSettings) -> None:
        self.s = s
        self.cost = np.zeros(k)
        self.cost_set = np.zeros(k, bool)
        self.set_counter = np.zeros(k, int)
        self.up = np.zeros(k, int)
        self.down = np.zeros(k, int)
        self.moved_up = np.zeros(k, bool)
        self.moved_down = np.zeros(k, bool)
        self.best_l1 = np.full(k, np.inf)
        self.best_asr = np.zeros(k)
        self.stale = np.zeros(k, int)
        self.done = np.zeros(k, bool)

    def check(self, k: int, asr: float, l1: float) -> bool:
        """Update class k after a check period; return True when it improved its best trigger."""
        s = self.s
        improved = False
        if asr >= s.asr_threshold and l1 < self.best_l1[k]:
            self.stale[k] = 0 if l1 < 0.99 * self.best_l1[k] else self.stale[k] + 1
            self.best_l1[k], self.best_asr[k] = l1, asr
            improved = True
        else:
            self.stale[k] += 1
        if not self.cost_set[k]:
            self.set_counter[k] = self.set_counter[k] + 1 if asr >= s.asr_threshold else 0
            if self.set_counter[k] >= s.patience:
                self.cost[k], self.cost_set[k] = s.init_cost, True
                self.up[k] = self.down[k] = 0
        else:
            if asr >= s.asr_threshold:
                self.up[k], self.down[k] = self.up[k] + 1, 0
            else:
                self.up[k], self.down[k] = 0, self.down[k] + 1
            if self.up[k] >= s.patience:
                self.up[k], self.moved_up[k] = 0, True
                self.cost[k] *= 2.0
            elif self.down[k] >= s.patience:
                self.down[k], self.moved_down[k] = 0, True
                self.cost[k] /= 2.0 ** 1.5
        moved = self.moved_up[k] and (self.moved_down[k] or not s.stop_needs_down_move)
        if moved and self.stale[k] >= s.early_stop_patience:
            self.done[k] = True
        return improved


def restore_triggers(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    settings: RestorationSettings,
    seed: int,
    device: torch.device,
    slots: int,
    size_penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    extra_terms: ExtraTerms | None = None,
    classes: list[int] | None = None,
    progress: Progress | None = None,
    name: str = "restore",
    bf16: bool = False,
) -> RestorationOutcome:
    """Optimise a trigger for every class in `classes` (default all) and keep each one's best.

    size_penalty(mask (A,1,H,W), pattern (A,C,H,W)) -> (A,) is the term the cost multiplies
    (Neural Cleanse: the mask's L1; TABOR: its eq. (2)/R2 regularisers). extra_terms adds
    fixed-weight per-class terms (TABOR's R3/R4) whose images go through the model in the same
    forward pass as the stamped batch: one pass per step instead of three. On 2 CPU cores a TABOR
    step of 10 classes on fm-square5-br went from 6.8 to 6.2 ms per class (9%; with its 8 blocked
    images and the overlay per class it costs 1.2-1.4x a Neural Cleanse step); on a GPU, where a
    small pass is launch-bound, fewer passes should matter more (not measured).
    """
    classes = list(range(num_classes)) if classes is None else list(classes)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(x).to(device)
    labels = torch.from_numpy(y).to(device)
    n, c, h, w = images.shape
    k_all = num_classes
    mask_table = (torch.rand((k_all, 1, h, w), generator=generator) * 2 - 1).to(device)
    pattern_table = (torch.rand((k_all, c, h, w), generator=generator) * 2 - 1).to(device)
    best_mask = to_unit(mask_table).clone()
    best_pattern = to_unit(pattern_table).clone()
    streams = class_streams(seed, classes)
    mask_rows, pattern_rows = _ActiveAdam(settings.lr), _ActiveAdam(settings.lr)
    schedule = _Schedule(k_all, settings)
    steps = np.zeros(k_all, int)
    reached = np.zeros(k_all, bool)
    waiting = list(classes)
    active: list[int] = []
    kept: list[int] = []  # slots of `active` that stay after a class left
    period_asr = np.zeros(k_all)
    period_l1 = np.zeros(k_all)
    period_n = np.zeros(k_all, int)
    finished = 0
    slots = max(1, min(slots, len(classes)))
    regroup = True

    while waiting or active:
        if regroup:
            joining = waiting[:slots - len(active)]
            del waiting[:len(joining)]
            active += joining
            new_rows = torch.tensor(joining, dtype=torch.long, device=device)
            m_param = mask_rows.regroup(kept, mask_table[new_rows])
            p_param = pattern_rows.regroup(kept, pattern_table[new_rows])
            rows = torch.tensor(active, device=device)
            targets = rows.repeat_interleave(settings.batch_size)
            regroup = False
        picked = class_batches(streams, active, n, settings.batch_size).to(device)
        batch = images[picked]  # (A, B, C, H, W): each class its own images
        mask, pattern = to_unit(m_param), to_unit(p_param)
        stamped = stamp(batch, mask, pattern)
        extra_inputs, extra_loss_of = (extra_terms(batch, labels[picked], mask, pattern, rows)
                                       if extra_terms is not None else (stamped[:0], None))
        all_logits = logits_of(model, torch.cat([stamped, extra_inputs]) if len(extra_inputs) else stamped, bf16)
        logits = all_logits[:len(stamped)]
        ce = F.cross_entropy(logits, targets, reduction="none").view(len(active), -1).mean(1)
        cost = torch.tensor(schedule.cost[active], dtype=ce.dtype, device=device)
        loss_per_class = ce + cost * size_penalty(mask, pattern)
        if extra_loss_of is not None:
            loss_per_class = loss_per_class + extra_loss_of(all_logits[len(stamped):])
        m_grad, p_grad = torch.autograd.grad(loss_per_class.sum(), (m_param, p_param))
        mask_rows.step(m_grad)
        pattern_rows.step(p_grad)

        with torch.no_grad():  # one transfer per step (one device sync on a GPU)
            finite = (torch.isfinite(m_grad).all() & torch.isfinite(p_grad).all()).float()
            hits = (logits.argmax(1) == targets).float().view(len(active), -1).mean(1)
            l1 = mask.sum(dim=(1, 2, 3))
            step_stats = torch.cat([hits, l1, finite[None]]).cpu().numpy()
        if not step_stats[-1]:  # the step is lost with the whole restoration
            raise TrojanScanError(f"{name}: trigger optimisation diverged (NaN/inf gradient)")
        hits, l1 = step_stats[:len(active)], step_stats[len(active):-1]
        leaving = []
        for slot, k in enumerate(active):
            steps[k] += 1
            period_asr[k] += hits[slot]
            period_l1[k] += l1[slot]
            period_n[k] += 1
            if period_n[k] == settings.check_every:
                asr, mean_l1 = period_asr[k] / period_n[k], period_l1[k] / period_n[k]
                period_asr[k] = period_l1[k] = period_n[k] = 0
                reached[k] |= asr >= settings.asr_threshold
                if schedule.check(k, asr, mean_l1):
                    best_mask[k] = mask[slot].detach()
                    best_pattern[k] = pattern[slot].detach()
            if schedule.done[k] or steps[k] >= settings.max_steps:
                leaving.append(k)
        if leaving:
            kept = [slot for slot, k in enumerate(active) if k not in leaving]
            active = [active[slot] for slot in kept]
            regroup = True
            for _ in leaving:
                finished += 1
                if progress is not None:
                    progress(name, finished, len(classes))

    masks = best_mask[:, 0].cpu().numpy()
    patterns = best_pattern.cpu().numpy()
    if not (np.isfinite(masks).all() and np.isfinite(patterns).all()):
        raise TrojanScanError(f"{name}: restored triggers contain NaN")
    mask_l1 = np.where(np.isfinite(schedule.best_l1), schedule.best_l1, masks.reshape(k_all, -1).sum(1))
    return RestorationOutcome(masks, patterns, mask_l1, schedule.best_asr, steps, reached, slots, bf16)


@torch.no_grad()
def attack_success(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                   pattern: np.ndarray, target: int, device: torch.device, batch_size: int = 256) -> float:
    """Share of clean images not of `target` that the restored trigger sends to `target`."""
    keep = y != target
    if not keep.any():
        return 0.0
    images = torch.from_numpy(x[keep]).to(device)
    m = torch.from_numpy(mask)[None, None].to(device)
    p = torch.from_numpy(pattern)[None].to(device)
    hits = 0
    for start in range(0, len(images), batch_size):
        stamped = stamp(images[start:start + batch_size], m, p)
        hits += int((model(stamped).argmax(1) == target).sum())
    return hits / int(keep.sum())


CPU_BATCHES = (32, 64, 128, 256, 512)
# A GPU keeps gaining far past 512 on small models (an H200 ran a Fashion-MNIST CNN at 0.3 M
# images/s at 512 and 1 M at 2048): there every class can share one step.
GPU_BATCHES = CPU_BATCHES + (1024, 2048, 4096)


NEAR_FASTEST = 0.85  # choose_slots takes the largest batch at least this fast relative to the fastest


def device_batches(device: torch.device) -> tuple[int, ...]:
    """The batch sizes worth probing on this kind of device."""
    return CPU_BATCHES if device.type == "cpu" else GPU_BATCHES


def batch_mb(size: int, input_shape: tuple[int, ...]) -> float:
    """A rough bound of a step's memory: inputs, stamped copies and their gradients."""
    return size * 4 * math.prod(input_shape) * 8 / 1e6


def fastest_batch(model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device,
                  candidates: tuple[int, ...] | None = None, repeats: int = 3, min_seconds: float = 0.05,
                  memory_budget_mb: float | None = None, bf16: bool = False) -> tuple[int, dict[int, float]]:
    """Measure forward+backward images/s (gradient w.r.t. the input, as restoration needs) for
    each candidate batch size (default `device_batches`), each over at
    least `repeats` passes and `min_seconds` (a few milliseconds of a small batch are mostly
    noise), with the model in bfloat16 autocast when `bf16`; return the fastest that fits the
    memory budget and all rates."""
    import time

    if candidates is None:
        candidates = device_batches(device)
    rates: dict[int, float] = {}

    def forward_backward(x: torch.Tensor) -> None:
        x.grad = None
        logits_of(model, x, bf16).logsumexp(1).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for size in candidates:
        if memory_budget_mb is not None and batch_mb(size, input_shape) > memory_budget_mb:
            break
        x = torch.rand((size, *input_shape), device=device, requires_grad=True)
        forward_backward(x)  # warm-up
        started, passes = time.perf_counter(), 0
        while passes < repeats or time.perf_counter() - started < min_seconds:
            forward_backward(x)
            passes += 1
        rates[size] = size * passes / (time.perf_counter() - started)
    best = max(rates, key=rates.get)  # type: ignore[arg-type]
    return best, rates


def near_fastest_batch(rates: dict[int, float]) -> int:
    """The largest batch size whose images/s is at least NEAR_FASTEST times the best rate."""
    top = max(rates.values())
    return max(size for size, rate in rates.items() if rate >= NEAR_FASTEST * top)


def bf16_native(device: torch.device) -> bool:
    """Whether the device has bfloat16 arithmetic: a CPU with AVX512-BF16 or AMX instructions
    (as torch's CPU capability checks report them) or a GPU that supports it (Ampere and newer).
    Elsewhere bfloat16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def usable_batches(device: torch.device, images_per_class: int, num_classes: int) -> tuple[int, ...]:
    """The step sizes a restoration of `num_classes` classes can take: the device's candidate
    batches below `num_classes * images_per_class` (every class active) and that one itself.
    Probing larger batches measured steps the restoration never makes (512 for 10 classes of 32)."""
    every_class = num_classes * images_per_class
    return tuple(size for size in device_batches(device) if size < every_class) + (every_class,)


def choose_slots(model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device,
                 images_per_class: int, num_classes: int, memory_budget_mb: float | None = None,
                 precision: str = "fp32", slots: int = 0) -> tuple[int, bool, dict]:
    """How many classes to optimise together, and whether the model computes in bfloat16.

    Precision: "fp32" or "bf16" as given; "auto" is bfloat16 exactly where the device has
    bfloat16 arithmetic (`bf16_native`), decided without timing so that a device always restores
    in the same precision (see the module docstring).

    Slots: the device's batch over images per class. The batch is the largest of the usable ones
    (`usable_batches`) whose raw rate, in the chosen precision, is within `NEAR_FASTEST` of the
    fastest: a restoration step also pays per-step costs the probe leaves out (per-class
    bookkeeping, Adam on the rows), so at a near tie fewer, larger steps win; and on a CPU the
    rates of 32..512 lie so close that taking the argmax let noise pick one class at a time.
    `slots` > 0 fixes them, and nothing is timed. Slots change the speed only: each class draws
    its own images (`class_streams`).
    Returns (slots, bf16, probe notes)."""
    bf16 = {"fp32": False, "bf16": True, "auto": bf16_native(device)}[precision]
    notes: dict = {"precision": "bf16" if bf16 else "fp32"}
    if slots:
        return slots, bf16, notes
    candidates = usable_batches(device, images_per_class, num_classes)
    if memory_budget_mb is not None:  # at least the smallest, as a restoration needs one step
        candidates = tuple(c for c in candidates if batch_mb(c, input_shape) <= memory_budget_mb) or candidates[:1]
    rates = dict(sorted(fastest_batch(model, input_shape, device, candidates=candidates, bf16=bf16)[1].items()))
    batch = near_fastest_batch(rates)
    chosen = max(1, min(num_classes, round(batch / images_per_class)))
    notes |= {"fastest_batch": max(rates, key=rates.get), "chosen_batch": batch,  # type: ignore[arg-type]
              "images_per_second": {str(k): round(v, 1) for k, v in rates.items()}}
    return chosen, bf16, notes


def plan_restoration(model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device,
                     settings: RestorationSettings, num_classes: int) -> tuple[int, bool, dict]:
    """Slots and precision for a restoration of `num_classes` classes: as the settings fix them,
    or chosen for the device (`choose_slots`). Returns (slots, bf16, notes)."""
    slots, bf16, probe = choose_slots(model, input_shape, device, settings.batch_size, num_classes,
                                      precision=settings.precision, slots=settings.slots)
    return slots, bf16, ({"device_probe": probe} if not settings.slots else {}) | {"precision": probe["precision"]}
