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

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from oprd.losses.masking import masked_sum

Objective = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
Estimator = Literal["exact", "topk", "topk_sg", "sampled"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


@dataclass(frozen=True)
class TokenLossConfig:
    """Token-space distillation term: which divergence, how it is estimated, and how logits are formed."""

    objective: Objective = "reverse_kl"
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


@dataclass(frozen=True)
class HeadRule:
    """What a family's causal-LM forward does to `lm_head(final normed state)`, as the config fields it reads.

    oprd applies `logits * scale / divide`, then the soft cap `cap * tanh(logits / cap)`; a field set to None in the
    config is skipped, as the forward skips it.
    """

    scale: str | None = None
    """Field the logits are multiplied by."""
    divide: str | None = None
    """Field the logits are divided by (or, the same thing for a bias-free head, the hidden state before the head)."""
    softcap: str | None = None
    """Field holding the soft cap."""


_GEMMA_CAP = HeadRule(softcap="final_logit_softcapping")
_COHERE_SCALE = HeadRule(scale="logit_scale")
_GRANITE_SCALING = HeadRule(divide="logits_scaling")

HEAD_RULES: dict[str, HeadRule] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), _COHERE_SCALE),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
        _GRANITE_SCALING,
    ),
    # The multimodal Gemma 3n/4 forwards cap with their text config's field. Gemma 3's (model type `gemma3`) does
    # not cap at all, even when its text config sets a cap, so it is deliberately absent.
    **dict.fromkeys(
        (
            "beam",
            "gemma2",
            "gemma3_text",
            "gemma3n",
            "gemma3n_text",
            "gemma4",
            "gemma4_text",
            "gemma4_unified",
            "gemma4_unified_text",
            "inkling2_loop_text",
            "inkling2_text",
            "nanochat",
            "vaultgemma",
        ),
        _GEMMA_CAP,
    ),
    "recurrent_gemma": HeadRule(softcap="logits_soft_cap"),
    "xlstm": HeadRule(softcap="output_logit_soft_cap"),
    # Same field name as Granite's, opposite direction: HyperCLOVA X multiplies.
    "hyperclovax": HeadRule(scale="logits_scaling"),
    "falcon_h1": HeadRule(scale="lm_head_multiplier"),
    # These two divide the hidden state before a bias-free head, which divides the logits.
    "minicpm3": HeadRule(divide="logits_scaling"),
    "inkling_text": HeadRule(divide="logits_mup_width_multiplier"),
}
"""Logit post-processing of every transformers causal-LM family whose forward has any, read from its modeling code
(`tests/test_families.py` proves each family against `model(...).logits`). A family absent here uses the bare head."""

_POST_LN = (
    "its blocks normalise after the residual add (post-LN) and no final norm follows them, so there is no final "
    "normed state for the head to read"
)
_HEAD_TRANSFORM = (
    "its LM head is an MLP (dense, activation, LayerNorm) in front of the vocabulary projection, not a linear map of "
    "the final normed state"
)
UNSUPPORTED_HEADS: dict[str, str] = {
    **dict.fromkeys(
        ("bart", "bert-generation", "blenderbot-small", "git", "marian", "mvp", "openai-gpt", "plbart", "trocr"),
        _POST_LN,
    ),
    **dict.fromkeys(
        (
            "bert",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "modernbert-decoder",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        ),
        f"it is a BERT-style model: {_HEAD_TRANSFORM}",
    ),
    "blt": "its head reads a local byte decoder fed by patch-level latents, not a stack of decoder layers",
    "cpmant": "it keeps its layers and final norm inside an `encoder` and prepends its own prompt and segment tokens",
    **dict.fromkeys(
        ("gemma4_assistant", "gemma4_unified_assistant"),
        "it is a speculative-decoding drafter whose forward needs the target model's shared KV states",
    ),
    "hrm_text": "it cycles two recurrent stacks (H and L modules) instead of running one list of decoder layers",
    **dict.fromkeys(
        ("musicgen", "musicgen_melody"),
        "it predicts audio codebooks with one head per codebook, not one vocabulary head",
    ),
    "prophetnet": "its head reads n-gram prediction streams, not the main stream's final normed state",
    "reformer": "its reversible layers hand the head two concatenated streams (width 2 * hidden_size)",
    "xlm": "its head (`pred_layer`) reads post-LN layers that have no final norm",
    "xlnet": "it is a two-stream permutation LM whose layers and head do not follow the decoder-only layout",
}
"""Families whose logits oprd cannot rebuild from a captured final normed state and the bare head, and why."""

_LOOSE_FIELDS = ("dim_model_base",)
"""Post-processing fields no `HEAD_RULES` entry names (MiniCPM3 reads it through `logits_scaling`)."""


def _known_families() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _remote_code(model_config) -> bool:
    """Whether the config points `AutoModelForCausalLM` at code outside transformers (`trust_remote_code`)."""
    return "AutoModelForCausalLM" in (getattr(model_config, "auto_map", None) or {})


def _text_config(model_config):
    """Where a multimodal config keeps its language model's fields; the config itself for a text-only model."""
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def _rule(model_config) -> HeadRule:
    """The family's rule; a config without a model type reads the common names (Gemma's cap, Cohere's scale)."""
    family = getattr(model_config, "model_type", None)
    if family is None:
        return HeadRule(scale="logit_scale", softcap="final_logit_softcapping")
    return HEAD_RULES.get(family, HeadRule())


def model_logit_transforms(model_config) -> tuple[float | None, float | None]:
    """`(scale, soft cap)` the model's own forward applies to its LM head outputs; None where it applies none.

    Args:
        model_config: the model's transformers config (a multimodal one reads its text config's fields).

    Returns:
        The multiplier (a divisor is returned as its reciprocal) and the soft cap, as `TokenLossConfig` takes them.
    """
    rule, fields = _rule(model_config), _text_config(model_config)
    scale, divisor, cap = (
        getattr(fields, name, None) if name else None for name in (rule.scale, rule.divide, rule.softcap)
    )
    if divisor:
        scale = (scale or 1.0) / divisor
    return (float(scale) if scale else None), (float(cap) if cap else None)


def with_model_logit_transforms(config: TokenLossConfig | None, model_config) -> TokenLossConfig | None:
    """Fill in the model family's own logit scale and soft cap (see `HEAD_RULES`) where the loss config leaves them
    unset, so the chunked path optimises what the model's forward computes. Returns a new config; the caller's is
    never mutated."""
    if config is None:
        return None
    scale, cap = model_logit_transforms(model_config)
    updates = {}
    if config.logit_softcap is None and cap:
        updates["logit_softcap"] = cap
    if config.logit_scale is None and scale:
        updates["logit_scale"] = scale
    return dataclasses.replace(config, **updates) if updates else config


def _post_processing_set(model_config) -> list[str]:
    """The logit post-processing fields known to oprd that the config (or its text config) sets: to anything but
    None, and for a multiplier or divisor also anything but 1."""
    fields = _text_config(model_config)
    factors = sorted({name for rule in HEAD_RULES.values() for name in (rule.scale, rule.divide) if name})
    others = sorted({rule.softcap for rule in HEAD_RULES.values() if rule.softcap} | set(_LOOSE_FIELDS))
    found = [name for name in factors if getattr(fields, name, None) not in (None, 1, 1.0)]
    return found + [name for name in others if getattr(fields, name, None) is not None]


def check_head_reproducible(model_config) -> None:
    """Refuse, before any weights load, a model whose logits oprd cannot rebuild from its final normed state.

    Accepted: every transformers causal-LM family except those in `UNSUPPORTED_HEADS` and the OPT variants whose head
    reads an output projection. A family whose forward oprd has not read (custom code, or a model type transformers
    does not know) is accepted only if it sets none of the logit post-processing fields known to oprd: their meaning
    differs between families (Granite divides by `logits_scaling`, HyperCLOVA X multiplies by it).

    Raises:
        ValueError: naming the family and what oprd cannot reproduce.
    """
    family = getattr(model_config, "model_type", None) or type(model_config).__name__
    reason = UNSUPPORTED_HEADS.get(family)
    if family == "opt" and not (
        getattr(model_config, "do_layer_norm_before", True)
        and getattr(model_config, "word_embed_proj_dim", None) in (None, model_config.hidden_size)
    ):
        reason = "this OPT variant projects (`project_out`) or has no final norm, so the head does not read a norm"
    if reason is None and (_remote_code(model_config) or family not in _known_families()):
        found = _post_processing_set(model_config)
        if found:
            reason = (
                f"its config sets {', '.join(found)}, and oprd has not read how this family's own (custom) forward "
                "applies them to the logits"
            )
    if reason is not None:
        raise ValueError(
            f"oprd cannot reproduce the logits of model type {family!r} from its final normed state: {reason}. "
            "Token-space terms and held-out KL need them; use another model family."
        )


def check_same_logit_transforms(student_config, teacher_config) -> None:
    """Refuse a student and teacher whose families post-process logits differently.

    One `TokenLossConfig` (filled from the student's config) forms both models' logits, so a Gemma 2 teacher with a
    Llama student would have its soft cap silently dropped.

    Raises:
        ValueError: naming both families and their `(scale, soft cap)`.
    """
    student, teacher = model_logit_transforms(student_config), model_logit_transforms(teacher_config)
    if student != teacher:
        names = [getattr(c, "model_type", "?") for c in (student_config, teacher_config)]
        raise ValueError(
            f"The student ({names[0]!r}) and teacher ({names[1]!r}) post-process their logits differently "
            f"((scale, soft cap) {student} vs {teacher}); oprd forms both with one setting, so it would be wrong "
            "for one of them."
        )
