"""LoRA students through `peft`: only the adapters (and the objective's projectors) train and are checkpointed.

The student becomes a `peft.PeftModel`; `oprd.models.layers.decoder` looks through it (`get_base_model`) to the
decoder whose layers now hold the adapters, so capture hooks and the teacher-style early exit work unchanged and the
gradient reaches the adapters. `oprd export` writes the merged model (or, with `--adapter`, the adapter alone).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter on the student (`peft.LoraConfig`)."""

    r: int = 16
    """Rank of the adapter matrices."""
    alpha: int = 32
    """Scale numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = field(default="all-linear")
    """Modules that get an adapter: `all-linear` (every linear layer but the LM head) or names (`[q_proj, v_proj]`)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"lora.r must be >= 1 and lora.alpha > 0, got r={self.r}, alpha={self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}.")


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """The model with LoRA adapters (seeded initialisation; the base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    target = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def merged(model: nn.Module) -> nn.Module:
    """A plain model with the adapters folded into the weights (the student itself is left as it is)."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


def frozen_base_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of a LoRA model's frozen weights (rebuilt from its model path, so left out of checkpoints);
    none for a model without adapters."""
    if not is_lora(model):
        return set()
    return {f"{prefix}{name}" for name, param in model.named_parameters() if not param.requires_grad}
