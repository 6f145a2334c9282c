"""The masked reduction every loss shares: sums over the tokens a mask keeps, and a mean that never divides by 0.

Shape legend:
    b  batch (sequences)
    t  tokens
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of per-token values over the tokens the mask keeps.

    Args:
        values: `[b, t]` per-token loss values.
        mask: `[b, t]` bool or 0/1 mask of tokens that count.
    """
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Mean of per-token values over kept tokens; `num_tokens` overrides the denominator (global normalisation).

    The token count is clamped to at least 1 so a batch with no response tokens gives 0, not NaN.
    """
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=values.device)
    return masked_sum(values, mask) / count.to(values.dtype).clamp_min(1)
