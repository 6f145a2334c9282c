"""Running per-dimension statistics of the teacher's hidden states, for the standardised hidden loss.

Shape legend:
    n  response tokens in a batch
    d  teacher width

LLM hidden states carry a few dimensions hundreds of times larger than the rest (SmolLM2's per-dimension MSE starts
near 270 while the KL starts near 7), so a plain per-dimension MSE is mostly a loss on those few dimensions. Dividing
each dimension's error by the teacher's standard deviation in that dimension weighs them alike. The statistics are
exact running moments over every response token the teacher has produced in training (Chan et al.'s pairwise update,
in float64), updated from teacher states only, never with gradient, and saved in checkpoints (buffers), so a resumed
run standardises exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

STD_FLOOR = 0.01
"""No dimension's standard deviation counts as less than this fraction of the median one: a near-constant dimension
would otherwise dominate the loss."""


class RunningMoments(nn.Module):
    """Count, mean and sum of squared deviations of `d`-dimensional vectors, updated batch by batch.

    Args:
        width: d.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(width, dtype=torch.float64))

    @torch.no_grad()
    def update(self, states: Tensor, mask: Tensor) -> None:
        """Add the vectors of `states` `[b, t, d]` that `mask` `[b, t]` keeps.

        Under data parallelism every rank adds every rank's vectors, in rank order (one all-gather of `2d + 1`
        numbers): the moments, and so the loss, are those of the whole step on every rank, as in one process. Every
        rank must call this the same number of times (training steps do).
        """
        kept = rearrange(states.detach(), "b t d -> (b t) d")[rearrange(mask.bool(), "b t -> (b t)")].double()
        n_b = torch.tensor(float(kept.shape[0]), dtype=torch.float64, device=kept.device)
        mean_b = kept.mean(dim=0) if kept.shape[0] else kept.new_zeros(kept.shape[1])
        for n, mean, m2 in _every_rank(n_b, mean_b, (kept - mean_b).pow(2).sum(dim=0)):
            if n > 0:
                self._add(n, mean, m2)

    def _add(self, n_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        """Merge a batch's count, mean and sum of squared deviations (Chan et al.)."""
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta.pow(2) * self.count * n_b / total
        self.count.copy_(total)

    def std(self) -> Tensor:
        """`[d]` standard deviation per dimension (population), floored at `STD_FLOOR` of the median (and at 1e-6),
        float64 like the moments (the loss casts it to its own precision)."""
        std = (self.m2 / self.count.clamp_min(1)).sqrt()
        return std.clamp_min(STD_FLOOR * std.median()).clamp_min(1e-6)


def _every_rank(n: Tensor, mean: Tensor, m2: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each rank's `(n, mean, m2)` in rank order; this rank's alone outside a process group."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [(n, mean, m2)]
    packed = torch.cat([n[None], mean, m2])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    d = mean.shape[0]
    return [(row[0], row[1 : d + 1], row[d + 1 :]) for row in gathered]
