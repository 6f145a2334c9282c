"""Hidden-state distillation losses and the shared masked reduction.

Shape legend:
    b  batch (sequences)
    t  tokens (positions in the concatenated prompt + response)
    d  hidden width (of the teacher after projection)

Every loss here returns the *sum* over selected tokens; the caller divides by the count of those tokens over the
whole optimizer step (all micro-batches, all ranks), so that gradient accumulation and data parallelism do not change
the objective, and a `first_k` / `last_k` term does not shrink as responses grow. `masked_mean` exists for logging
and for callers that know their denominator up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor

from oprd.losses.masking import masked_mean, masked_sum
from oprd.losses.weighting import LayerWeights

HiddenKind = Literal["mse", "cosine", "normalized_mse", "standardized_mse"]
Positions = Literal["all", "last_k", "first_k"]
HIDDEN_KINDS: tuple[str, ...] = get_args(HiddenKind)
POSITIONS: tuple[str, ...] = get_args(Positions)


def select_positions(mask: Tensor, positions: Positions = "all", k: int = 1) -> Tensor:
    """Restrict a response mask to all, the first k, or the last k response tokens of each sequence.

    Args:
        mask: `[b, t]` response mask (contiguous run of ones per row).
        positions: which response positions to keep.
        k: how many, for `first_k` / `last_k`.

    Returns:
        `[b, t]` bool mask.
    """
    mask = mask.bool()
    if positions == "all":
        return mask
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}; choose one of {POSITIONS}.")
    if k < 1:
        raise ValueError(f"positions={positions!r} needs k >= 1, got k={k}.")
    from_start = mask.long().cumsum(dim=1)  # 1 on the first response token, 2 on the second, ...
    if positions == "first_k":
        return mask & (from_start <= k)
    from_end = mask.sum(dim=1, keepdim=True) - from_start + 1  # 1 on the last response token
    return mask & (from_end <= k)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """OPRD's per-dimension squared error, summed over kept tokens: sum_t m_t ||s_t - t_t||^2 / d.

    Args:
        student: `[b, t, d]` projected student hidden states.
        teacher: `[b, t, d]` teacher hidden states (detached by the caller or here).
        mask: `[b, t]` tokens that count.
    """
    per_token = reduce((student - teacher.detach()).pow(2), "b t d -> b t", "mean")
    return masked_sum(per_token, mask)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Cosine distance `1 - cos(s_t, t_t)`, summed over kept tokens."""
    per_token = 1 - F.cosine_similarity(student, teacher.detach(), dim=-1)
    return masked_sum(per_token, mask)


def hidden_normalized_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Squared error of L2-normalised vectors (OPRD-Bridge stage 2), summed over kept tokens; equals 2 - 2 cos."""
    diff = F.normalize(student, dim=-1) - F.normalize(teacher.detach(), dim=-1)
    per_token = reduce(diff.pow(2), "b t d -> b t", "sum")
    return masked_sum(per_token, mask)


def hidden_standardized_mse(student: Tensor, teacher: Tensor, mask: Tensor, std: Tensor) -> Tensor:
    """Per-dimension squared error in units of the teacher's standard deviation, summed over kept tokens:
    sum_t m_t mean_d ((s_td - t_td) / std_d)^2.

    Args:
        std: `[d]` the teacher's standard deviation per dimension (`oprd.objective.statistics.RunningMoments`).
    """
    std = std.detach().to(at_least_float32(student).dtype)  # the moments are float64; the loss keeps its precision
    per_token = reduce(((student - teacher.detach()) / std).pow(2), "b t d -> b t", "mean")
    return masked_sum(per_token, mask)


def basis_coordinates(states: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """States `[..., d]` as coordinates in an orthonormal basis `[d, r]` around `mean` `[d]`: `[..., r]`, in float32
    (the Bridge's teacher side; a remote teacher computes it where the states are)."""
    return (states.float() - mean) @ basis


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32, or in its own dtype when that is wider (float64): low-precision states are compared in float32,
    and a float64 run stays float64 end to end."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine, "normalized_mse": hidden_normalized_mse}


@torch.no_grad()
def mean_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean cosine similarity over kept tokens, for logging (`train/cos/<layer>`)."""
    return masked_mean(F.cosine_similarity(at_least_float32(student), at_least_float32(teacher), dim=-1), mask)


@dataclass(frozen=True)
class HiddenLossConfig:
    """How the student's projected hidden states are compared with the teacher's."""

    kind: HiddenKind = "mse"
    """`mse` (OPRD's per-dimension squared error), `cosine` (1 - cos), `normalized_mse` (OPRD-Bridge) or
    `standardized_mse` (each dimension's error over the teacher's running standard deviation in it)."""
    positions: Positions = "all"
    """Which response positions count: `all`, the first k (`first_k`) or the last k (`last_k`); the term is a mean
    over the tokens selected."""
    k: int = 1
    """k for `first_k` / `last_k`."""
    layer_weights: LayerWeights = "uniform"
    """How the layer pairs' terms add up: `uniform` mean, `late` (deeper layers weigh more), `balanced` (each layer's
    term rescaled to the mean by a detached ratio) or `learned` (uncertainty weighting, Kendall et al. 2018)."""

    def __post_init__(self) -> None:
        if self.kind not in HIDDEN_KINDS:
            raise ValueError(f"Unknown hidden loss {self.kind!r}; valid names: {', '.join(HIDDEN_KINDS)}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; valid names: {', '.join(POSITIONS)}.")
        if self.layer_weights not in get_args(LayerWeights):
            names = ", ".join(get_args(LayerWeights))
            raise ValueError(f"Unknown layer_weights {self.layer_weights!r}; valid names: {names}.")
        if self.k < 1:
            raise ValueError(f"k must be at least 1 (positions={self.positions!r} keeps k tokens), got {self.k}.")


def hidden_loss_sums(
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    mask: Tensor,
    config: HiddenLossConfig,
    stds: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-pair summed hidden loss over the selected response tokens.

    Args:
        student: pair label -> `[b, t, d]` projected student states.
        teacher: pair label -> `[b, t, d]` teacher states.
        mask: `[b, t]` response mask.
        config: loss kind and position selection.
        stds: pair label -> `[d]` teacher standard deviations (`standardized_mse` only).

    Returns:
        pair label -> scalar sum (divide by the step's count of selected tokens, then average over pairs).
    """
    keep = select_positions(mask, config.positions, config.k)
    if config.kind == "standardized_mse":
        if stds is None:
            raise ValueError("hidden_loss kind 'standardized_mse' needs the teacher's standard deviations (stds).")
        return {
            label: hidden_standardized_mse(
                at_least_float32(student[label]), at_least_float32(teacher[label]), keep, stds[label]
            )
            for label in student
        }
    fn = HIDDEN_LOSSES[config.kind]
    return {label: fn(at_least_float32(student[label]), at_least_float32(teacher[label]), keep) for label in student}
