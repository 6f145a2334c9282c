"""The optimizer and learning-rate schedule of the student and the objective's learned parts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a cosine (or constant) schedule."""

    lr: float = 1e-5
    """Learning rate of the student."""
    projector_lr: float | None = None
    """Learning rate of the projectors (None: same as `lr`); projectors between unequal widths start random."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up: cosine to zero over the run, or constant."""


def build_optimizer(
    config: OptimConfig, student: Iterable[nn.Parameter], objective: Iterable[nn.Parameter], total_steps: int
) -> dict:
    """AdamW over the trainable student parameters and the objective's (projectors), with its schedule.

    Returns:
        what `LightningModule.configure_optimizers` returns: the optimizer and a per-step scheduler.
    """
    groups = [
        {"params": [p for p in student if p.requires_grad], "lr": config.lr},
        {"params": list(objective), "lr": config.projector_lr or config.lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, max(total_steps, 1))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
