"""Hyper-parameters as checkpoints and the CLI hold them: plain values (dicts, lists, numbers, strings).

Config dataclasses become dicts when saved, so `torch.load(weights_only=True)` reads every checkpoint, and come back
as dataclasses when a module is rebuilt from them (LightningCLI and `load_from_checkpoint` hand back dicts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """A config dataclass as a dict; anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def from_plain(cls: type[T], value: T | Mapping[str, Any]) -> T:
    """`cls(**value)` for a mapping; a `cls` instance as it is."""
    return cls(**value) if isinstance(value, Mapping) else value
