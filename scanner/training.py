"""A seeded, deterministic training loop that is fast on CPU, and accuracy evaluation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from scanner.data import CleanData


class TrainSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(3, ge=1, le=100)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


def seed_everything(seed: int) -> None:
    """Seed torch and make its kernels deterministic where it can."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_classifier(
    model: nn.Module,
    data: CleanData,
    settings: TrainSettings,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train with Adam and cross-entropy on shuffled mini-batches; same seed, same weights."""
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(x))
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted labels for images x (N, C, H, W); the model must already be in eval mode
    (exported programs refuse `.eval()`)."""
    out = [
        model(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def accuracy(model: nn.Module, data: CleanData) -> float:
    """Share of images predicted as their label (clean accuracy, or ASR on a triggered set)."""
    return float((predict(model, data.x) == data.y).mean())
