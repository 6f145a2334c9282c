"""A parameter-free projector: each student channel is compared with one teacher channel, chosen once.

Shape legend:
    n    collected response tokens (rows)
    d_s  student width
    d_t  teacher width

Flex-KD reports that learned linear projectors distort the teacher's states, and distils a
narrower student on a selection of the teacher's own hidden units instead, with nothing learned in between. Here the
selection is a one-to-one matching of the student's `d_s` channels to `d_s` of the teacher's, chosen once.

A student pruned from its teacher, in width (Minitron) or depth (ShortGPT) or both, copied its residual channels
from the teacher's: each column of its embedding is a column of the teacher's, and its LM head reads the channels in
the teacher's basis. Its matching is that copy, read off the two embeddings (`copied_channels`), the same at every
layer and for every seed. Any other student is matched by correlation on states collected before the first step (the
Bridge's calibration rollouts): each student channel with the teacher channel it already follows most. On a pruned
student that estimate is noisy: on a 15-layer depth pruning of the arithmetic teacher it left up to 67% of a layer's
channels off the copy, and two seeds' samples disagreed on up to 63% of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oprd.models.capture import Point
from oprd.objective.bridge import BridgeConfig, split_rows
from oprd.objective.projectors import pair_label


def check_select_widths(student_width: int, teacher_width: int) -> None:
    """`projector: select` picks d_s of the teacher's channels, so the student may not be wider (checked before any
    weight loads)."""
    if student_width > teacher_width:
        raise ValueError(
            f"projector: select compares each of the student's {student_width} channels with one of the teacher's "
            f"{teacher_width}, so the student cannot be wider: use projector: linear or bridge."
        )


class SelectProjectors(nn.Module):
    """Per pair, the teacher channel `[d_s]` each student channel is compared with (a buffer, saved in checkpoints);
    `calibrated` says whether the matching has run, so a resumed run does not redo it. No parameters.

    Args:
        config: the calibration's collection settings (`rows`, `batches`, `holdout`), shared with the Bridge.
    """

    kind = "select"
    """The prefix of the calibration's metrics."""

    def __init__(
        self, pairs: Sequence[tuple[Point, Point]], student_width: int, teacher_width: int, config: BridgeConfig
    ) -> None:
        super().__init__()
        check_select_widths(student_width, teacher_width)
        self.pairs, self.config = list(pairs), config
        for label in self.labels:
            self.register_buffer(f"channels_{label}", torch.arange(student_width))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def labels(self) -> list[str]:
        return [pair_label(pair) for pair in self.pairs]

    def channels(self, label: str) -> Tensor:
        return getattr(self, f"channels_{label}")

    def calibrated_message(self, rows: int, explained: float, cosine: float) -> str:
        """What the calibration log says, given its means over layers."""
        return (
            f"select: matched the student's channels to the teacher's on {rows} rows per layer: the chosen channels "
            f"hold {100 * explained:.1f}% of the teacher's variance and reach held-out cosine {cosine:.3f} (means "
            "over layers)."
        )

    def forward(self, student_states: dict[Point, Tensor]) -> dict[str, Tensor]:
        """Each pair's student state `[b, t, d_s]`, as it is."""
        return {label: student_states[s] for label, (s, _) in zip(self.labels, self.pairs, strict=True)}

    def targets(self, teacher_states: dict[Point, Tensor]) -> dict[str, Tensor]:
        """Each pair's teacher state `[b, t, d_t]` -> its matched channels `[b, t, d_s]`."""
        return {
            label: teacher_states[t][..., self.channels(label)]
            for label, (_, t) in zip(self.labels, self.pairs, strict=True)
        }

    @torch.no_grad()
    def copy_channels(self, channels: Tensor) -> None:
        """Compare each student channel with the teacher channel `channels` `[d_s]` it was copied from, at every pair,
        instead of calibrating (`copied_channels`)."""
        for label in self.labels:
            self.channels(label).copy_(channels)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def calibrate(self, student_rows: dict[str, Tensor], teacher_rows: dict[str, Tensor], seed: int = 0) -> dict:
        """Match every pair's channels on collected rows.

        Args:
            student_rows: pair label -> `[n, d_s]` student states.
            teacher_rows: pair label -> `[n, d_t]` teacher states at the same tokens.

        Returns:
            per pair label: `explained` (the teacher's variance in the chosen channels, as a fraction of all of it)
            and `cosine` (held-out rows, student state vs the teacher's chosen channels).
        """
        report = {}
        for label in self.labels:
            x, y = student_rows[label].double(), teacher_rows[label].double()
            train, test = split_rows(x.shape[0], self.config.holdout, seed)
            channels = match_channels(correlation(x[train], y[train]))
            self.channels(label).copy_(channels)
            variance = y[train].var(dim=0)
            cosine = F.cosine_similarity(x[test], y[test][:, channels], dim=-1).mean()
            report[label] = {"explained": float(variance[channels].sum() / variance.sum()), "cosine": float(cosine)}
        self.calibrated.fill_(True)
        return report


def correlation(x: Tensor, y: Tensor) -> Tensor:
    """`[d_x, d_y]` Pearson correlation of every column of `x` `[n, d_x]` with every column of `y` `[n, d_y]`
    (a constant column correlates 0 with everything)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    xs = xc / xc.norm(dim=0).clamp_min(1e-30)
    ys = yc / yc.norm(dim=0).clamp_min(1e-30)
    return xs.T @ ys


def match_channels(scores: Tensor) -> Tensor:
    """A one-to-one matching of rows to columns of `scores` `[d_s, d_t]` (d_s <= d_t), greedy by decreasing score:
    the best remaining (row, column) pair is taken and both leave the pool. Returns `[d_s]` column indices."""
    rows, columns = scores.shape
    chosen, column_free, left = [-1] * rows, [True] * columns, rows
    for index in scores.flatten().argsort(descending=True, stable=True).tolist():
        row, column = divmod(index, columns)
        if chosen[row] < 0 and column_free[column]:
            chosen[row], column_free[column], left = column, False, left - 1
            if not left:
                break
    return torch.tensor(chosen)


KEY_ROWS = 16
"""Embedding rows whose values key a column in `copied_channels` (each candidate is then compared whole)."""


@torch.no_grad()
def copied_channels(student: Tensor, teacher: Tensor) -> Tensor | None:
    """The teacher channel each student channel is an exact copy of, read off the input embeddings: `[d_s]` column
    indices of `teacher` `[V, d_t]` such that every column of `student` `[V, d_s]` equals its own (compared in the
    teacher's dtype), or None when one does not (another vocabulary, or weights of the student's own)."""
    if student.shape[0] != teacher.shape[0] or student.shape[1] > teacher.shape[1]:
        return None
    student = student.to(teacher.dtype)
    rows = torch.linspace(0, teacher.shape[0] - 1, min(KEY_ROWS, teacher.shape[0])).long()
    by_key: dict[tuple, list[int]] = {}
    for column, key in enumerate(map(tuple, teacher[rows].T.tolist())):
        by_key.setdefault(key, []).append(column)
    chosen: list[int] = []
    taken: set[int] = set()
    for column, key in enumerate(map(tuple, student[rows].T.tolist())):
        copy = next(
            (c for c in by_key.get(key, []) if c not in taken and torch.equal(student[:, column], teacher[:, c])), None
        )
        if copy is None:
            return None
        chosen.append(copy)
        taken.add(copy)
    return torch.tensor(chosen)
