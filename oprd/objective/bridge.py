"""OPRD-Bridge: hidden states of different widths compared in a shared low-rank subspace of the teacher's.

Shape legend:
    n    collected response tokens (rows)
    d_s  student width
    d_t  teacher width
    r    rank of the shared subspace

A plain `Linear(d_S, d_T)` trained from scratch on the distillation loss did not align a Qwen3-4B teacher with a
Qwen3-0.6B student (cosine near 0, then repetition collapse). The OPRD paper's Bridge instead, per mapped layer:
(1) collects on-policy hidden states of both models; (2) fixes the teacher side to the top-r PCA basis of the
teacher's centred states (`eigh` of the covariance); (3) calibrates a student projector `d_S -> r` by regression on
the collected pairs, then freezes it (or trains on); (4) compares the two r-dim vectors L2-normalised
(`hidden_loss.kind: normalized_mse`). The paper fits the regression with 20 epochs of Adam; here it is solved in
closed form (ridge least squares, float64), the minimiser that those epochs approach.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oprd.losses.hidden import basis_coordinates
from oprd.models.capture import Point
from oprd.objective.projectors import pair_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeConfig:
    """How the Bridge's subspaces and student projectors are calibrated (with `projector: bridge`)."""

    rank: int = 8
    """r, the dimension of the shared subspace (the paper's best: 8); at most the teacher's width."""
    rows: int = 16384
    """At most this many response tokens per layer are collected for the calibration."""
    batches: int = 8
    """Rollout batches (of `data.batch_size` training prompts) sampled for the calibration."""
    holdout: float = 0.1
    """Fraction of the collected rows held out to report the student projector's cosine."""
    ridge: float = 1e-4
    """Ridge strength of the regression, relative to the mean variance of the student's states."""
    train_projector: bool = False
    """Keep training the calibrated student projectors during distillation (the teacher basis stays fixed)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1 (the paper's best is 8), got {self.rank}.")
        if self.rows < 2 or self.batches < 1:
            raise ValueError(f"rows must be >= 2 and batches >= 1, got {self.rows}, {self.batches}.")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must lie in (0, 1), got {self.holdout}.")


def check_rank(config: BridgeConfig, teacher_width: int) -> None:
    """The rank must fit the teacher's width (checked before any weight loads)."""
    if config.rank > teacher_width:
        raise ValueError(
            f"model.objective.bridge.rank = {config.rank} exceeds the teacher's width {teacher_width}: choose "
            f"1..{teacher_width} (the paper's best is 8)."
        )


class BridgeProjectors(nn.Module):
    """Per pair: a frozen teacher basis (mean `[d_t]`, basis `[d_t, r]`) and a student projector `d_s -> r`.

    All of it is in the state dict (the calibration is saved in checkpoints), with `calibrated` saying whether the
    calibration has run: a resumed run does not redo it.
    """

    kind = "bridge"
    """The prefix of the calibration's metrics."""

    def __init__(
        self, pairs: Sequence[tuple[Point, Point]], student_width: int, teacher_width: int, config: BridgeConfig
    ) -> None:
        super().__init__()
        self.pairs, self.config = list(pairs), config
        self.student = nn.ModuleDict()
        for pair in self.pairs:
            label = pair_label(pair)
            self.student[label] = nn.Linear(student_width, config.rank).requires_grad_(config.train_projector)
            self.register_buffer(f"mean_{label}", torch.zeros(teacher_width))
            self.register_buffer(f"basis_{label}", torch.zeros(teacher_width, config.rank))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def labels(self) -> list[str]:
        return [pair_label(pair) for pair in self.pairs]

    def calibrated_message(self, rows: int, explained: float, cosine: float) -> str:
        """What the calibration log says, given its means over layers."""
        return (
            f"Bridge calibrated on {rows} rows per layer: rank-{self.config.rank} bases keep {100 * explained:.1f}% "
            f"of the teacher's variance (mean over layers); student projectors reach held-out cosine {cosine:.3f}."
        )

    def forward(self, student_states: dict[Point, Tensor]) -> dict[str, Tensor]:
        """Each pair's student state `[b, t, d_s]` -> `[b, t, r]`."""
        pairs = zip(self.labels, self.pairs, strict=True)
        return {label: self.student[label](student_states[s]) for label, (s, _) in pairs}

    def targets(self, teacher_states: dict[Point, Tensor]) -> dict[str, Tensor]:
        """Each pair's teacher state `[b, t, d_t]` -> its coordinates in the teacher basis, `[b, t, r]`."""
        return {
            label: basis_coordinates(teacher_states[t], getattr(self, f"mean_{label}"), getattr(self, f"basis_{label}"))
            for label, (_, t) in zip(self.labels, self.pairs, strict=True)
        }

    def teacher_projection(self) -> dict[str, tuple[Point, Tensor, Tensor]]:
        """What `targets` applies to the teacher, for a teacher that applies it itself: pair label -> (teacher point,
        mean `[d_t]`, basis `[d_t, r]`), on the CPU."""
        return {
            label: (t, getattr(self, f"mean_{label}").cpu(), getattr(self, f"basis_{label}").cpu())
            for label, (_, t) in zip(self.labels, self.pairs, strict=True)
        }

    @torch.no_grad()
    def calibrate(self, student_rows: dict[str, Tensor], teacher_rows: dict[str, Tensor], seed: int = 0) -> dict:
        """Fit every pair's teacher basis and student projector on collected rows.

        Args:
            student_rows: pair label -> `[n, d_s]` student states.
            teacher_rows: pair label -> `[n, d_t]` teacher states at the same tokens.

        Returns:
            per pair label: `explained` (variance fraction the basis keeps) and `cosine` (held-out, student projector
            vs teacher coordinates).
        """
        report = {}
        for label in self.labels:
            mean, basis, explained = pca(teacher_rows[label], self.config.rank)
            getattr(self, f"mean_{label}").copy_(mean)
            getattr(self, f"basis_{label}").copy_(basis)
            targets = (teacher_rows[label].double() - mean.double()) @ basis.double()
            weight, bias, cosine = regress(student_rows[label], targets, self.config, seed)
            self.student[label].weight.copy_(weight)
            self.student[label].bias.copy_(bias)
            report[label] = {"explained": explained, "cosine": cosine}
        self.calibrated.fill_(True)
        return report


def pca(rows: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Mean `[d]`, top-`rank` principal directions `[d, rank]` (by decreasing variance) and the fraction of the
    variance they keep, from `eigh` of the covariance of the centred rows `[n, d]` (float64)."""
    x = rows.double()
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / x.shape[0]
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    top = vectors[:, -rank:].flip(-1)
    return mean.float(), top.float(), float(values[-rank:].sum() / values.sum().clamp_min(1e-30))


def split_rows(rows: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of `rows` row indices: (fit, held out), the held-out part a `holdout` fraction (at least one)."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    held = max(int(holdout * rows), 1)
    return order[held:], order[:held]


def regress(inputs: Tensor, targets: Tensor, config: BridgeConfig, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """Ridge least squares `targets ~ inputs @ W.T + b` on a seeded training split; the held-out cosine of the fit.

    Returns:
        weight `[r, d_s]`, bias `[r]` (float32) and the mean held-out cosine between prediction and target.
    """
    x, y = inputs.double(), targets.double()
    train, test = split_rows(x.shape[0], config.holdout, seed)
    x_mean, y_mean = x[train].mean(0), y[train].mean(0)
    xc, yc = x[train] - x_mean, y[train] - y_mean
    ridge = config.ridge * xc.pow(2).mean() * xc.shape[0]
    gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc).T  # [r, d_s]
    bias = y_mean - weight @ x_mean
    predicted = x[test] @ weight.T + bias
    cosine = F.cosine_similarity(predicted, y[test], dim=-1).mean()
    return weight.float(), bias.float(), float(cosine)
