"""Token-space (logit) distillation objectives and their estimators.

Shape legend:
    b  batch (sequences)
    t  tokens (positions in the concatenated prompt + response)
    v  vocabulary (the shared tokenizer's; padded LM-head rows are sliced off with `slice_vocab`)
    k  outcomes a top-k estimator keeps (k, or k + 1 with the tail bucket)

Objectives compare the student's next-token distribution p_S with the teacher's p_T at every position:
forward KL(p_T || p_S), reverse KL(p_S || p_T), generalized JSD(beta) as in TRL's GKD (arXiv 2306.13649, Eq. 1)
and total variation. Estimators say which outcomes are summed (full vocabulary, the student's top-k) or replace
the sum by the sampled token. Every per-token function works on any leading shape (`[b, t, v]` or `[n, v]`), which
is what lets `oprd.losses.lm_head` run them on flattened chunks. As in `oprd.losses.hidden`, `token_loss_sum`
returns the *sum* over kept tokens; the caller divides by the response-token count of the whole optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from oprd.losses.masking import masked_sum

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
Estimator = Literal["exact", "topk", "topk_sg", "sampled"]
OBJECTIVES: tuple[str, ...] = get_args(Divergence)
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


@dataclass(frozen=True)
class TokenLossConfig:
    """Token-space distillation term: which divergence, how it is estimated, and how logits are formed."""

    objective: Divergence = "reverse_kl"
    """`forward_kl` KL(p_T||p_S), `reverse_kl` KL(p_S||p_T), `jsd` generalized JSD(beta), `tvd` total variation."""
    estimator: Estimator = "exact"
    """`exact` (full vocabulary), `topk` (the student's top-k tokens), `topk_sg` (top-k with the score-function
    gradient, see `topk_sg_reverse_kl`) or `sampled` (sampled token as a policy-gradient advantage; reverse KL only)."""
    beta: float = 0.5
    """JSD interpolation in [0, 1]: 0 is forward KL, 1 is reverse KL, mixture m = beta p_T + (1 - beta) p_S."""
    temperature: float = 1.0
    """Distillation temperature: both models' logits are divided by it before the softmax."""
    top_k: int = 16
    """Number of student top tokens kept by the `topk` / `topk_sg` estimators (capped at the vocabulary size)."""
    tail: bool = False
    """Add a (k+1)-th outcome holding each model's mass outside the top-k, so the terms form proper distributions."""
    chunk_size: int = 1024
    """Tokens per LM-head chunk when logits are computed from hidden states; 0 builds full logits (reference path)."""
    logit_softcap: float | None = None
    """Gemma-style soft cap `cap * tanh(logits / cap)` applied to LM-head outputs computed from hidden states."""
    logit_scale: float | None = None
    """Multiplier applied to LM-head outputs computed from hidden states (e.g. Cohere's `logit_scale`)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown token objective {self.objective!r}; valid names: {', '.join(OBJECTIVES)}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Unknown token estimator {self.estimator!r}; valid names: {', '.join(ESTIMATORS)}.")
        if self.estimator == "sampled" and self.objective != "reverse_kl":
            raise ValueError(
                f"estimator='sampled' is only defined for objective='reverse_kl' (got {self.objective!r}): the "
                "sampled token is drawn from the student, so it estimates an expectation under p_S."
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = dense), got {self.chunk_size}.")
        for name in ("logit_softcap", "logit_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}.")


def slice_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Drop padded LM-head rows: `[..., v_padded] -> [..., vocab_size]` (heads are often padded to a multiple of 64)."""
    if vocab_size > logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits' last dimension {logits.shape[-1]}.")
    return logits[..., :vocab_size]


def apply_logit_transforms(logits: Tensor, config: TokenLossConfig) -> Tensor:
    """Scale (`logits * logit_scale`) then soft-cap (`cap * tanh(logits / cap)`) raw LM-head outputs, if configured.

    Only for logits computed from hidden states with the bare head weight: a model's own forward already applies
    them, and applying them twice changes the distribution.
    """
    if config.logit_scale is not None:
        logits = logits * config.logit_scale
    if config.logit_softcap is not None:
        logits = config.logit_softcap * torch.tanh(logits / config.logit_softcap)
    return logits


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Tempered log-softmax over the last dimension, in at least float32 (bf16 softmaxes lose the tail)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(logits / temperature, dim=-1)


def _p_log_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Elementwise `p * (log p - log q)`, exactly 0 where p == 0.

    The `where` sits on the log-ratio, not on the product, so outcomes with -inf in both models give 0 with a zero
    (not NaN) gradient: the product rule would otherwise multiply a zero upstream gradient by `-inf - -inf`.
    """
    p = logp.exp()
    return p * torch.where(p > 0, logp - logq, 0.0)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_T || p_S) summed over the last dimension: `[..., v] -> [...]`."""
    return _p_log_ratio(teacher_logp, student_logp).sum(-1)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_S || p_T) summed over the last dimension: `[..., v] -> [...]`."""
    return _p_log_ratio(student_logp, teacher_logp).sum(-1)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """TRL's generalized JSD: beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S.

    The mixture form tends to 0 at both ends (it behaves like beta * forward KL near 0 and (1 - beta) * reverse KL
    near 1), so, like TRL, the endpoints are special-cased to the plain KLs.

    Args:
        student_logp: `[..., v]` student log-probabilities.
        teacher_logp: `[..., v]` teacher log-probabilities.
        beta: interpolation in [0, 1].

    Returns:
        `[...]` divergence per position.
    """
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    # A finite floor keeps logaddexp's backward NaN-free where both models put -inf; such outcomes have p = 0 in
    # both KL terms, so the floor never reaches a value.
    floor = torch.finfo(student_logp.dtype).min / 2
    mixture_logp = torch.logaddexp(
        teacher_logp.clamp_min(floor) + math.log(beta), student_logp.clamp_min(floor) + math.log1p(-beta)
    )
    kl_teacher = _p_log_ratio(teacher_logp, mixture_logp).sum(-1)
    kl_student = _p_log_ratio(student_logp, mixture_logp).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance 0.5 * sum |p_S - p_T|: `[..., v] -> [...]`."""
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


def divergence(student_logp: Tensor, teacher_logp: Tensor, objective: str, beta: float = 0.5) -> Tensor:
    """Dispatch to one objective over the last dimension: `[..., v] -> [...]`."""
    if objective == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if objective == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if objective == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    if objective == "tvd":
        return total_variation(student_logp, teacher_logp)
    raise ValueError(f"Unknown token objective {objective!r}; valid names: {', '.join(OBJECTIVES)}.")


def _tail_logp(logp: Tensor, index: Tensor) -> Tensor:
    """`[..., 1]` log of the mass outside `index`, as a logsumexp of the rest (no `1 - sum` cancellation).

    The finite floor stands in for -inf so logsumexp's backward stays NaN-free when nothing is left (k = v).
    """
    floor = torch.finfo(logp.dtype).min / 2
    rest = logp.clamp_min(floor).scatter(-1, index, floor)
    return torch.logsumexp(rest, dim=-1, keepdim=True)


def topk_log_probs(student_logp: Tensor, teacher_logp: Tensor, k: int, tail: bool = False) -> tuple[Tensor, Tensor]:
    """Both models' full-vocabulary log-probs restricted to the student's top-k tokens (no renormalisation).

    Args:
        student_logp: `[..., v]` student log-probabilities (selects the tokens; the selection carries no gradient).
        teacher_logp: `[..., v]` teacher log-probabilities.
        k: tokens to keep, capped at v.
        tail: append each model's remaining mass as a (k+1)-th outcome.

    Returns:
        `([..., k], [..., k])`, or `[..., k + 1]` each with the tail bucket last.
    """
    index = student_logp.detach().topk(min(k, student_logp.shape[-1]), dim=-1).indices
    student_k, teacher_k = student_logp.gather(-1, index), teacher_logp.gather(-1, index)
    if tail:
        student_k = torch.cat([student_k, _tail_logp(student_logp, index)], dim=-1)
        teacher_k = torch.cat([teacher_k, _tail_logp(teacher_logp, index)], dim=-1)
    return student_k, teacher_k


def topk_sg_reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """sum_i p_S(i) * sg(log p_S(i) - log p_T(i)): reverse KL's value, score-function gradient.

    Its gradient sum_i p_S(i) grad log p_S(i) (log p_S(i) - log p_T(i)) is the full-vocabulary reverse-KL gradient
    restricted to the kept outcomes. Differentiating the plain sum adds sum_i grad p_S(i), which vanishes over a
    complete distribution but not over a top-k subset, so the two differ only without the tail bucket.

    Args:
        student_logp: `[..., k]` student log-probs of the kept outcomes.
        teacher_logp: `[..., k]` teacher log-probs of the same outcomes.

    Returns:
        `[...]` per position.
    """
    p = student_logp.exp()
    return (p * torch.where(p > 0, student_logp - teacher_logp, 0.0).detach()).sum(-1)


def sampled_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, targets: Tensor) -> Tensor:
    """Single-sample reverse KL at the sampled token y, trained as a policy gradient (Thinking Machines' OPD).

    The advantage a = sg(log p_S(y) - log p_T(y)) multiplies grad log p_S(y), an unbiased estimate of the reverse-KL
    gradient when y ~ p_S. The returned value is a itself (the k1 estimate of KL(p_S || p_T), which is what one wants
    to log); `a * (log p_S(y) - sg(log p_S(y)))` adds exactly zero to it but carries the gradient a * grad log p_S(y).

    Args:
        student_logp: `[..., v]` student log-probabilities.
        teacher_logp: `[..., v]` teacher log-probabilities.
        targets: `[...]` sampled next-token ids.

    Returns:
        `[...]` per position.
    """
    index = rearrange(targets.long(), "... -> ... 1")
    student_y = rearrange(student_logp.gather(-1, index), "... 1 -> ...")
    teacher_y = rearrange(teacher_logp.gather(-1, index), "... 1 -> ...")
    advantage = (student_y - teacher_y).detach()
    return advantage + advantage * (student_y - student_y.detach())


def token_loss_per_token(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None, config: TokenLossConfig
) -> Tensor:
    """Per-position token-space distillation loss.

    Logits are used as given: slice padded vocabularies with `slice_vocab` and apply `apply_logit_transforms` first
    where the logits come from a bare LM head (`oprd.losses.lm_head` does both).

    Args:
        student_logits: `[b, t, v]` student logits (any leading shape works), with gradient.
        teacher_logits: `[b, t, v]` teacher logits; detached here.
        targets: `[b, t]` token sampled at the next position; required by the `sampled` estimator only.
        config: objective, estimator and temperature.

    Returns:
        `[b, t]` per-token values in at least float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "slice both to the shared tokenizer vocabulary with slice_vocab."
        )
    student_logp = log_probs(student_logits, config.temperature)
    teacher_logp = log_probs(teacher_logits.detach(), config.temperature)
    if config.estimator == "sampled":  # TokenLossConfig refused any objective but reverse KL with it
        if targets is None:
            raise ValueError("estimator='sampled' needs the sampled next-token ids (targets).")
        return sampled_reverse_kl(student_logp, teacher_logp, targets)
    if config.estimator in ("topk", "topk_sg"):
        student_logp, teacher_logp = topk_log_probs(student_logp, teacher_logp, config.top_k, config.tail)
    reverse = config.objective == "reverse_kl" or (config.objective == "jsd" and config.beta == 1)
    if config.estimator == "topk_sg" and reverse:
        return topk_sg_reverse_kl(student_logp, teacher_logp)
    # For forward KL, TVD and JSD(beta < 1) the per-outcome gradient w.r.t. p_S(i) has no constant part, so the
    # score-function form of topk_sg is the plain top-k gradient.
    return divergence(student_logp, teacher_logp, config.objective, config.beta)


def token_loss_sum(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None, mask: Tensor, config: TokenLossConfig
) -> Tensor:
    """Token-space loss summed over the tokens the mask keeps.

    Args:
        student_logits: `[b, t, v]` student logits.
        teacher_logits: `[b, t, v]` teacher logits.
        targets: `[b, t]` sampled next-token ids (`sampled` estimator); masked positions may hold anything (-100).
        mask: `[b, t]` response mask.
        config: the token-loss configuration.

    Returns:
        Scalar sum; divide by the step's response-token count.
    """
    keep = mask.bool()
    if targets is not None:
        targets = targets.masked_fill(~keep, 0)
    values = token_loss_per_token(student_logits, teacher_logits, targets, config)
    # Zero dropped positions before the product: 0 * inf is NaN, and padding positions may hold anything.
    return masked_sum(values.masked_fill(~keep, 0.0), keep)
