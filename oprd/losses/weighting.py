"""How the hidden-state terms of the layer pairs add up to one hidden term.

* `uniform`: the mean over pairs (OPRD).
* `late`: pair i of n weighs (i + 1) / sum(1..n): later layers, closer to the output, count more.
* `balanced`: each pair's term is rescaled by a detached ratio to the mean term, so every layer contributes the same
  and no layer's large error drowns the others; the value equals the uniform mean, only the gradient is rebalanced
  (it is the gradient of the mean of log terms, times the mean term).
* `learned`: homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018): per pair a learned log
  variance s, term exp(-s) * L + s, trained with the projectors; a layer that stays hard to match is weighed down.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

LayerWeights = Literal["uniform", "late", "balanced", "learned"]


class LayerWeighting(nn.Module):
    """Mixes per-pair hidden-term sums into one sum.

    Args:
        mode: see the module docstring.
        pairs: number of layer pairs (in the order of the layer map).
    """

    def __init__(self, mode: LayerWeights = "uniform", pairs: int = 0) -> None:
        super().__init__()
        self.mode = mode
        if mode == "learned":
            self.log_variance = nn.Parameter(torch.zeros(pairs))

    def forward(self, sums: Tensor, tokens: Tensor) -> Tensor:
        """`[p]` per-pair sums over `tokens` response tokens -> the hidden term (a sum over the same tokens)."""
        if self.mode == "late":
            weights = torch.arange(1, len(sums) + 1, device=sums.device, dtype=sums.dtype)
            return (weights * sums).sum() / weights.sum()
        if self.mode == "balanced":
            ratio = sums.detach().mean() / sums.detach().clamp_min(torch.finfo(sums.dtype).tiny)
            return (ratio * sums).mean()
        if self.mode == "learned":
            s = self.log_variance
            # The regulariser is per token, like every term: a sum over this micro-batch's tokens.
            return (torch.exp(-s) * sums + s * tokens).mean()
        return sums.mean()
