"""The learned projections from student to teacher hidden states, one per mapped layer pair.

Shape legend:
    b    batch
    t    tokens
    d_s  student width
    d_t  teacher width
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oprd.models.capture import Point


def pair_label(pair: tuple[Point, Point]) -> str:
    """Stable name of a pair, used for projector keys and metric names (`train/hidden/3_7`)."""
    return f"{pair[0]}_{pair[1]}"


class Projectors(nn.Module):
    """One `Linear(d_S, d_T, bias=False)` per mapped pair; identity-initialised when the widths match.

    Args:
        pairs: the resolved layer map.
        student_width: d_S.
        teacher_width: d_T.
    """

    def __init__(self, pairs: Sequence[tuple[Point, Point]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = list(pairs)
        self.proj = nn.ModuleDict()
        for pair in self.pairs:
            linear = nn.Linear(student_width, teacher_width, bias=False)
            if student_width == teacher_width:
                with torch.no_grad():
                    linear.weight.copy_(torch.eye(teacher_width))
            self.proj[pair_label(pair)] = linear

    @property
    def labels(self) -> list[str]:
        return [pair_label(pair) for pair in self.pairs]

    def forward(self, student_states: dict[Point, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Project each pair's student state `[b, t, d_S]` to `[b, t, d_T]`, keyed by pair label."""
        return {pair_label(p): self.proj[pair_label(p)](student_states[p[0]]) for p in self.pairs}

    def targets(self, teacher_states: dict[Point, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each pair's teacher state `[b, t, d_T]`, as it is, keyed by pair label."""
        return {pair_label(p): teacher_states[p[1]] for p in self.pairs}
