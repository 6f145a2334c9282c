"""Depth pruning by importance: keep the decoder layers that change the hidden state most on calibration prompts.

Shape legend:
    b  calibration prompts
    t  tokens
    d  hidden width
    l  decoder layers

ShortGPT (arXiv 2403.03853) scores each layer by its block influence, `BI_i = 1 - E_t[cos(x_i, x_{i+1})]` over
the tokens of calibration prompts, where `x_i` is the hidden state entering layer i and `x_{i+1}` the one leaving
it: a layer whose output points where its input did barely changes the residual stream, and is the cheapest to drop.
Minitron (arXiv 2407.14679) likewise drops the least important layers rather than every other one. The kept layers
are the `num_layers` with the highest influence, in their original order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from oprd.models.capture import HiddenCapture
from oprd.models.layers import find_layers

log = logging.getLogger(__name__)


@dataclass
class DepthPrune:
    """Depth-prune by importance: keep the decoder layers of highest block influence on calibration prompts."""

    num_layers: int
    """Decoder layers to keep."""
    calibration: str | None = None
    """Prompt source whose hidden states rank the layers (built-in name or JSONL file); None: the run's training
    prompts (`oprd` fills in `data.train`; elsewhere the built-in `arithmetic`)."""
    calibration_prompts: int = 32
    """Calibration prompts (the first of the source's training split)."""
    calibration_seed: int | None = None
    """The split of a built-in calibration source, so that it ranks on training prompts only; None: the run's
    `data.seed` (elsewhere 0, the data's default)."""
    calibration_num_val: int | None = None
    """Held-out prompts of a built-in calibration source; None: the run's `data.num_val` (elsewhere 100)."""

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"depth.num_layers must be >= 1, got {self.num_layers}.")
        if self.calibration_prompts < 1:
            raise ValueError(f"depth.calibration_prompts must be >= 1, got {self.calibration_prompts}.")


@torch.no_grad()
def block_influence(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, layers_path: str | None = None
) -> Tensor:
    """`[l]` block influence of every decoder layer: 1 - mean cosine between its input and output hidden states over
    the real (unpadded) tokens.

    Args:
        input_ids, attention_mask: `[b, t]` left-padded calibration prompts.
    """
    layers = find_layers(model, layers_path)
    entering = {}

    def keep_input(index: int):
        def hook(module, args, kwargs):
            entering[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        outputs = HiddenCapture(model, list(range(len(layers))), layers_path).run(input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    real = rearrange(attention_mask.bool(), "b t -> (b t)")
    scores = []
    for index in range(len(layers)):
        x_in = rearrange(entering[index].float(), "b t d -> (b t) d")[real]
        x_out = rearrange(outputs[index].float(), "b t d -> (b t) d")[real]
        scores.append(1 - F.cosine_similarity(x_in, x_out, dim=-1).mean())
    return torch.stack(scores)


def most_influential(scores: Tensor, num_layers: int) -> list[int]:
    """The `num_layers` layers of highest influence, in model order (ties: the earlier layer)."""
    if not 1 <= num_layers <= len(scores):
        raise ValueError(f"depth.num_layers must lie in 1..{len(scores)} (the model's layers), got {num_layers}.")
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:num_layers])
