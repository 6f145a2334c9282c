"""Losses as pure functions over token sums: hidden-state terms (`hidden`), token-space terms (`token`), the chunked
LM head that computes token terms from hidden states without `[b, t, v]` logits (`lm_head`), and the shared masked
reduction (`masking`)."""

from oprd.losses.hidden import HiddenLossConfig, hidden_loss_sums, mean_cosine
from oprd.losses.token import TokenLossConfig

__all__ = ["HiddenLossConfig", "TokenLossConfig", "hidden_loss_sums", "mean_cosine"]
