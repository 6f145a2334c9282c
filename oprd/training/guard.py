"""Numerical faults: find the term or parameter that went non-finite, name it, and stop or skip the step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

NonFinite = Literal["stop", "skip"]


def nonfinite_term(terms: Mapping[str, Tensor]) -> str | None:
    """The most specific loss term (`hidden/<pair>` before `hidden`) whose value is NaN or infinite, or None."""
    for name, value in sorted(terms.items(), key=lambda item: "/" not in item[0]):
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def nonfinite_grads(named_params: Iterable[tuple[str, nn.Parameter]], limit: int = 3) -> list[str]:
    """Names of (at most `limit`) parameters whose gradient holds NaN or infinity."""
    bad = []
    for name, param in named_params:
        if param.grad is not None and not torch.isfinite(param.grad).all():
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def describe_term(name: str) -> str:
    """`hidden/3_7` -> "the hidden-state term of layer pair 3_7 (student 3 -> teacher 7)"."""
    if name.startswith("hidden/"):
        pair = name.removeprefix("hidden/")
        student, _, teacher = pair.partition("_")
        return f"the hidden-state term of layer pair {pair} (student {student} -> teacher {teacher})"
    if name == "token":
        return "the token-space term"
    return f"the {name} term"


class NonFiniteGuard:
    """What a run does when a loss or gradient is NaN or infinite: `stop` (after saving the last good state) or
    `skip` the step, counting it.

    Args:
        mode: `stop` or `skip`.
    """

    def __init__(self, mode: NonFinite = "stop") -> None:
        self.mode = mode
        self.skipped = 0

    def handle(self, trainer, what: str) -> None:
        """Skip (count it; the caller drops the step) or stop with an error that names the step and the fix."""
        if self.mode == "skip":
            self.skipped += 1
            return
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / f"nonfinite-step{step}-last-good.ckpt"
        trainer.save_checkpoint(path)  # the bad update was not applied: these weights are the last good ones
        raise FloatingPointError(
            f"Step {step}: {what}. Saved the last good state to {path}. Lower the learning rate, set "
            "`model.nonfinite: skip` to skip such steps, or resume from the checkpoint with --ckpt_path."
        )
