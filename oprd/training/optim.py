"""The optimizer and learning-rate schedule of the student and the objective's learned parts."""

from __future__ import annotations

import math
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

    def __post_init__(self) -> None:
        # YAML reads `.inf` and `.nan` as floats: either makes every weight NaN at the first update.
        for name in ("lr", "projector_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}: the student's learning rate (e.g. 1e-5).")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ValueError(f"projector_lr must be > 0 or null (same as lr), got {self.projector_lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)} (AdamW's default: [0.9, 0.999]).")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")


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


def retune_saved_optimizer(config: OptimConfig, checkpoint: dict) -> None:
    """Make a resumed run use `config`'s learning rates, betas and weight decay.

    Lightning restores the saved optimizer and scheduler states over what `configure_optimizers` built, so without
    this a run resumed with `--model.optim.lr 1e-6` would go on at the old rate. The schedule position is kept: the
    current rate keeps its ratio to the base rate. Groups whose settings are unchanged are left bit for bit as saved.
    """
    rates = [config.lr, config.projector_lr or config.lr]
    for state in checkpoint.get("optimizer_states", []):
        for group, rate in zip(state.get("param_groups", []), rates, strict=False):
            base = group.get("initial_lr", group["lr"])
            if base != rate:
                group["lr"] = rate * (group["lr"] / base if base else 1.0)
                group["initial_lr"] = rate
            group.update(betas=tuple(config.betas), weight_decay=config.weight_decay)
    for state in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in state:
            state["base_lrs"] = rates[: len(state["base_lrs"])]


def scale_gradients(optimizer: torch.optim.Optimizer, factor: torch.Tensor | float) -> None:
    """Multiply every gradient the optimizer will use by `factor` (a Python float: FSDP2 gradients are DTensors,
    which refuse arithmetic with plain tensors)."""
    factor = float(factor)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.mul_(factor)
