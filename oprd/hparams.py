"""Hyper-parameters as checkpoints and the CLI hold them (plain values), and their typed, validated form.

Config dataclasses become dicts when saved, so `torch.load(weights_only=True)` reads every checkpoint, and come back
as dataclasses when a module is rebuilt from them (LightningCLI and `load_from_checkpoint` hand back dicts).
`typed_model_args` builds and checks them before any model loads, and its errors name the setting as the CLI spells
it (`model.optim.lr must be > 0, ...`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.models.spec import ModelSpec
from oprd.objective.bridge import BridgeConfig
from oprd.parallel.remote import RemoteTeacherConfig
from oprd.rollout.sampling import RolloutConfig
from oprd.training.optim import OptimConfig

T = TypeVar("T")

MODEL_CONFIGS: dict[str, type] = {
    "teacher": ModelSpec,
    "student": ModelSpec,
    "hidden_loss": HiddenLossConfig,
    "token_loss": TokenLossConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "bridge": BridgeConfig,
    "remote_teacher": RemoteTeacherConfig,
}
"""The `DistillModule` arguments that are config dataclasses."""


def to_plain(value: Any) -> Any:
    """A config dataclass as a dict; anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def from_plain(cls: type[T], value: T | Mapping[str, Any]) -> T:
    """`cls(**value)` for a mapping; a `cls` instance as it is."""
    return cls(**value) if isinstance(value, Mapping) else value


def typed_model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """`DistillModule` arguments with every config a validated dataclass and every number in range.

    Raises:
        ValueError: naming the setting (`model.rollout.top_p must lie in (0, 1], got 1.5; ...`).
    """
    typed = dict(args)
    for name, cls in MODEL_CONFIGS.items():
        if typed.get(name) is not None:
            try:
                typed[name] = from_plain(cls, typed[name])
            except (TypeError, ValueError) as err:
                fields = {f.name for f in dataclasses.fields(cls)}
                first = str(err).split(" ", 1)[0]
                raise ValueError(f"model.{name}.{err}" if first in fields else f"model.{name}: {err}") from err
    minimum = {
        "max_prompt_length": 1,
        "val_max_new_tokens": 1,
        "nonfinite_max_skips": 1,
        "eval_samples": 0,
        "hidden_weight": 0,
        "token_weight": 0,
    }
    for name, low in minimum.items():
        value = typed.get(name)
        # Written so that NaN fails too (YAML reads `.nan` and `.inf` as floats); a NaN weight makes every loss NaN.
        if value is not None and not low <= value < math.inf:
            raise ValueError(f"model.{name} must be >= {low} and finite, got {value}.")
    if typed.get("balance") and typed.get("token_loss") is None:
        raise ValueError(
            "model.balance: true rescales the hidden term to the token term, and there is no token term: set "
            "model.token_loss (e.g. {objective: reverse_kl}), or drop model.balance."
        )
    if typed.get("eval_samples"):
        if not 0 < typed.get("eval_temperature", 0.7) < math.inf:
            raise ValueError(
                f"model.eval_temperature must be > 0 and finite to sample, got {typed['eval_temperature']}."
            )
        if not 0 < typed.get("eval_top_p", 0.95) <= 1:
            raise ValueError(f"model.eval_top_p must lie in (0, 1], got {typed['eval_top_p']}.")
    return typed
