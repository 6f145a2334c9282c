"""How `oprd compare` picks an objective's learning rate from its runs, and what it says about the pick.

A rate is *chosen* only when several were tried: the best final score on the selection split wins, among runs that
did not diverge and scored a finite number. Equal scores are broken by the other metric (reverse KL for accuracy, and
the reverse), then by the order the rates were listed; the pick says which. A single rate is *given*, not chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

LOWER_IS_BETTER = {"reverse_kl", "repetition"}
OTHER_METRIC = {"reverse_kl": "accuracy", "accuracy": "reverse_kl"}
"""The metric that breaks a tie of the selection metric."""


@dataclass(frozen=True)
class Tried:
    """One learning rate of one objective, as the comparison ran it."""

    lr: float | None
    """The rate (None: the config's own)."""
    selection: dict[str, Any]
    """The run's last scores on the selection split (empty when it scored none)."""
    diverged: dict[str, Any] | None = None
    """`{"step": ..., "why": ...}` when the run stopped on a non-finite loss or gradient."""


@dataclass(frozen=True)
class Pick:
    """The rate an objective is reported at, and how it came to be that one."""

    lr: float | None
    """The rate reported (None with `how: none`, or the config's own rate)."""
    how: Literal["chosen", "given", "none"]
    """`chosen`: best of several on the selection split; `given`: the only rate tried; `none`: no rate to report
    (every one diverged or scored no finite number)."""
    note: str | None = None
    """How a tie was broken, or why no rate could be reported."""


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def pick_rate(tried: list[Tried], select: str) -> Pick:
    """The learning rate to report for one objective, from its runs in the order their rates were listed."""
    if not tried:
        return Pick(None, "none", "no run")
    if len(tried) == 1:
        run = tried[0]
        return Pick(None, "none", _diverged(run)) if run.diverged else Pick(run.lr, "given")
    usable = [run for run in tried if not run.diverged and finite(run.selection.get(select))]
    if not usable:
        why = "; ".join(_diverged(run) if run.diverged else f"{_rate(run.lr)} scored no {select}" for run in tried)
        return Pick(None, "none", why)
    best = _best(usable, select)
    tied = [run for run in usable if run.selection[select] == best]
    if len(tied) == 1:
        return Pick(tied[0].lr, "chosen")
    rates = ", ".join(_rate(run.lr) for run in tied)
    note = f"{select} tied at {best:.4g} between {rates}"
    other = OTHER_METRIC.get(select)
    scored = [run for run in tied if other is not None and finite(run.selection.get(other))]
    if scored:
        best_other = _best(scored, other)
        winners = [run for run in scored if run.selection[other] == best_other]
        if len(winners) == 1:
            return Pick(winners[0].lr, "chosen", f"{note}; broken by {other} ({best_other:.4g})")
        return Pick(winners[0].lr, "chosen", f"{note}, and {other} too; the first rate listed")
    return Pick(tied[0].lr, "chosen", f"{note}, and no {other or 'other metric'} to break it; the first rate listed")


def _best(runs: list[Tried], metric: str) -> float:
    values = [run.selection[metric] for run in runs]
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def _diverged(run: Tried) -> str:
    return f"{_rate(run.lr)} diverged at step {run.diverged['step']}"


def _rate(lr: float | None) -> str:
    """As written on the command line (`1e-4`, `3e-5`), like the table's column."""
    if lr is None:
        return "the config's rate"
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"
