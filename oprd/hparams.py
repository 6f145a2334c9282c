"""Hyper-parameters as checkpoints and the CLI hold them (plain values), and their typed, validated form.

The model's settings come in groups, each a dataclass that checks itself (`model.objective`, `model.rollout`,
`model.optim`, `model.eval`, `model.guard`, `model.teacher_placement`, the two model specs, and `model.teachers`, a
dict of `TeacherConfig`s). They become dicts when saved, so `torch.load(weights_only=True)` reads every checkpoint,
and come back as dataclasses when a module is rebuilt from them (LightningCLI and `load_from_checkpoint` hand back
dicts). `typed_model_args` builds and checks them before any model loads, and its errors name the setting as the CLI
spells it (`model.optim.lr must be > 0`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from oprd.distiller import EvalConfig, TeacherConfig
from oprd.models.spec import ModelSpec
from oprd.objective.objective import ObjectiveConfig
from oprd.parallel.placement import TeacherPlacement
from oprd.rollout.sampling import RolloutConfig
from oprd.training.guard import GuardConfig
from oprd.training.optim import OptimConfig

T = TypeVar("T")

MODEL_CONFIGS: dict[str, type] = {
    "teacher": ModelSpec,
    "student": ModelSpec,
    "objective": ObjectiveConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "guard": GuardConfig,
    "teacher_placement": TeacherPlacement,
}
"""The `DistillModule` arguments that are config dataclasses."""

MOVED: dict[str, str] = {
    **{name: f"objective.{name}" for name in (f.name for f in dataclasses.fields(ObjectiveConfig))},
    "val_max_new_tokens": "eval.max_new_tokens",
    "eval_model": "eval.model",
    "eval_samples": "eval.samples",
    "eval_temperature": "eval.temperature",
    "eval_top_p": "eval.top_p",
    "nonfinite": "guard.nonfinite",
    "nonfinite_max_skips": "guard.max_skips",
    "keep_last_good": "guard.keep_last_good",
    "teacher_device": "teacher_placement.device",
    "offload_teacher": "teacher_placement.offload",
    "shard_teacher": "teacher_placement.shard",
    "remote_teacher": "teacher_placement.remote",
}
"""Model settings of the flat layout before the groups -> where each is now (under `model.`)."""


def moved_message(old: str, where: str = "", flag: bool = False) -> str:
    """The one-line error for a setting of the flat layout: `old` is its key under `model.` (dotted deeper if given),
    `where` the place it was found (`--config my.yaml: `), `flag` whether it was a flag (then the new key is one)."""
    head, _, rest = old.partition(".")
    new = MOVED[head] + (f".{rest}" if rest else "")
    dashes = "--" if flag else ""
    return (
        f"{where}{dashes}model.{old} is now {dashes}model.{new}: the model's settings are grouped (objective, eval, "
        "guard, teacher_placement, next to rollout and optim)."
    )


def to_plain(value: Any) -> Any:
    """A config dataclass as a dict, and a dict's dataclasses too (`{"hidden_loss": HiddenLossConfig()}`, as a
    settings group may be given in Python); anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {key: to_plain(item) for key, item in value.items()} if isinstance(value, Mapping) else value


def from_plain(cls: type[T], value: T | Mapping[str, Any], name: str = "") -> T:
    """`cls(**value)` for a mapping, its nested config dataclasses built from their mappings first; a `cls` instance
    as it is.

    Args:
        name: the setting's CLI key (`model.objective`), to name it in errors.

    Raises:
        ValueError: naming the setting (`model.objective.bridge.rank must be >= 1, got 0.`).
    """
    if not isinstance(value, Mapping):
        return value
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(value)
    for key, item in value.items():
        inner = _config_class(hints.get(key)) if key in fields else None
        if inner is not None and isinstance(item, Mapping):
            kwargs[key] = from_plain(inner, item, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        first = str(err).split(" ", 1)[0]
        if first.startswith("model."):
            raise  # names its setting already
        raise ValueError(f"{name}.{err}" if first in fields else f"{name}: {err}") from err


def _config_class(hint: Any) -> type | None:
    """The config dataclass a field holds (`X` or `X | None`), if any."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    found = [option for option in options if dataclasses.is_dataclass(option)]
    return found[0] if found else None


def typed_model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """`DistillModule` arguments with every config a validated dataclass and every number in range.

    Raises:
        ValueError: naming the setting (`model.rollout.top_p must lie in (0, 1], got 1.5; ...`), or a setting of the
            flat layout with its new key.
    """
    moved = [key for key in args if key in MOVED]
    if moved:
        raise ValueError(moved_message(moved[0]))
    typed = dict(args)
    for name, cls in MODEL_CONFIGS.items():
        if typed.get(name) is not None:
            typed[name] = from_plain(cls, typed[name], f"model.{name}")
    teachers = typed.get("teachers") or {}
    typed["teachers"] = {
        name: from_plain(TeacherConfig, entry, f"model.teachers.{name}") for name, entry in teachers.items()
    }
    length = typed.get("max_prompt_length")
    if length is not None and not 1 <= length < math.inf:
        raise ValueError(f"model.max_prompt_length must be >= 1, got {length}.")
    return typed
