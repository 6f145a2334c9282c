"""What each model family's causal-LM forward does to its LM head's output, and which families oprd refuses.

A token-space term rebuilds the logits from a captured final normed state and the bare LM head, chunk by chunk; these
rules say which scale or soft cap the family's own forward applies on top (`tests/models/test_families.py` proves every
family against `model(...).logits`), and `check_head_reproducible` refuses, before weights load, a family whose head
is not a linear map of the final normed state.
"""

from __future__ import annotations

from dataclasses import dataclass


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
(`tests/models/test_families.py` proves each family against `model(...).logits`). A family absent here uses the bare
head."""

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
