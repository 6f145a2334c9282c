"""Every causal-LM family in transformers: oprd's head path rebuilds `model(...).logits`, or oprd refuses the family.

Each family is built tiny and random from its config, offline. Its final normed state is captured the way training
captures it (`HiddenCapture.run`, left padding, positions from the mask), pushed through `head_logits` with the
transforms `with_model_logit_transforms` derives from the config, and compared with the model's own logits. The
config fields through which any family post-processes its logits are set to values that move them (the defaults are
often neutral: Granite's `logits_scaling` is 1), so a family whose forward reads one that oprd ignores fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from oprd.losses.lm_head import Head, head_logits
from oprd.losses.token import TokenLossConfig
from oprd.models.capture import NORM, HiddenCapture, forward_inputs
from oprd.models.heads import (
    HEAD_RULES,
    UNSUPPORTED_HEADS,
    check_head_reproducible,
    check_same_logit_transforms,
    model_logit_transforms,
)
from oprd.models.layers import FINAL_NORM_BY_FAMILY
from oprd.objective.objective import with_model_logit_transforms

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
LAYERS, VOCAB = 2, 128
MAX_PARAMETERS = 5_000_000
"""A tiny config that still builds more than this was not shrunk: fail rather than allocate it."""

TINY = {
    **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, head_dim=16),
    **dict(num_attention_heads=4, num_key_value_heads=4, num_kv_heads=4, max_position_embeddings=64),
    # GPT-2, BART, XLM, CTRL, MPT, xLSTM and others name the same sizes differently.
    **dict(n_embd=64, n_layer=LAYERS, n_layers=LAYERS, num_layers=LAYERS, num_blocks=LAYERS, decoder_layers=LAYERS),
    **dict(encoder_layers=LAYERS, n_head=4, n_heads=4, num_heads=4, attention_heads=4, decoder_attention_heads=4),
    **dict(encoder_attention_heads=4, d_model=64, emb_dim=64, embedding_dim=64, n_inner=128, ffn_dim=128, d_inner=128),
    **dict(dff=128, dim_ff=128, decoder_ffn_dim=128, encoder_ffn_dim=128, ffn_hidden_size=128, dim_head=16),
    **dict(n_positions=64, n_ctx=64, max_seq_len=64, max_target_positions=64, rotary_dim=8),
    # Mixtures of experts.
    **dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, moe_intermediate_size=32),
    **dict(shared_expert_intermediate_size=32, num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2),
    **dict(n_group=1, topk_group=1, num_expert_group=1),
    # Multi-head latent attention, linear attention, state-space layers.
    **dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    **dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
    **dict(mamba_n_heads=8, mamba_d_head=16, mamba_headdim=16, n_mamba_heads=8, mamba_d_state=16, state_size=16),
    **dict(mamba_chunk_size=16, chunk_size=16, linear_head_dim=16, linear_num_heads=4),
}
"""Small sizes, under every name a config uses for them; a config gets those among its fields."""

POST_PROCESSING = {
    **dict(logit_scale=0.25, logits_scaling=4.0, lm_head_multiplier=0.5, logits_mup_width_multiplier=4.0),
    **dict(dim_model_base=16, final_logit_softcapping=0.1, logits_soft_cap=0.1, output_logit_soft_cap=0.1),
}
"""Every config field through which a family's forward scales or caps its logits, at a value that shows: random tiny
heads give logits of about 0.2, so a cap of 0.1 bends them."""

SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

EXTRA: dict[str, dict] = {
    "blt": dict(encoder_hash_byte_group_vocab=64),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dbrx": dict(
        attn_config=dict(rope_theta=1e4, kv_n_heads=4, clip_qkv=8.0),
        ffn_config=dict(hidden_size=64, ffn_hidden_size=64),
    ),
    "dots1": dict(n_shared_experts=1),
    "dots3_note": dict(
        text_config=dict(use_sliding_window=False, index_head_dim=16, index_n_heads=2),
        vision_config=dict(per_layer_config={}, adapter_in_dim=64, adapter_out_dim=64),
        audio_config=dict(adapter_input_size=64, adapter_out_dim=64),
    ),
    "dots3_note_text": dict(use_sliding_window=False, index_head_dim=16, index_n_heads=2),
    "falcon_h1": dict(mamba_d_ssm=128),
    "gemma3n_text": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "gemma4": dict(
        text_config=dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, global_head_dim=16)
    ),
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, global_head_dim=16),
    "gemma4_unified": dict(text_config=dict(global_head_dim=16)),
    "gemma4_unified_text": dict(global_head_dim=16),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "inkling2_loop_text": dict(unpadded_vocab_size=VOCAB),
    "inkling2_text": dict(unpadded_vocab_size=VOCAB),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "longcat_flash": dict(zero_expert_num=2, expert_ffn_hidden_size=32),
    "mamba2": dict(num_heads=8),
    "mimo_v2_flash": dict(head_dim=48, v_head_dim=16, num_key_value_heads=2),
    "olmo_hybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    "zamba": dict(num_hidden_layers=3, layer_types=["hybrid", "mamba", "hybrid"]),
    "zamba2": dict(num_hidden_layers=3, layers_block_type=["hybrid", "mamba", "hybrid"]),
}
"""What a family needs beyond `TINY`: fields that must agree with the small sizes, or that its defaults leave unset."""

HIDDEN_STATES_NOT_NORMED = {"gemma3n_text": "hidden states keep the AltUp streams apart; the head reads them merged"}
"""Families whose `output_hidden_states` last element is not the final normed state (the head check still runs)."""


pytestmark = pytest.mark.usefixtures("one_thread")


def skip_reason(model_type: str) -> str | None:
    """Why a family cannot be built here, or None."""
    if model_type == "gemma3n" and importlib.util.find_spec("timm") is None:
        return "the multimodal Gemma 3n builds its vision tower with timm, which is not installed (gemma3n_text runs)"
    return None


def tiny_fields(config: PretrainedConfig, extra: dict | None = None) -> dict:
    """Keyword arguments that shrink `config` (sub-configs too) and set its post-processing fields."""
    extra, layers, fields = extra or {}, getattr(config, "num_hidden_layers", None), dataclasses.fields(config)
    kwargs = {}
    for field in fields:
        name = field.name
        if name in TINY or name in POST_PROCESSING:
            kwargs[name] = TINY.get(name, POST_PROCESSING.get(name))
            continue
        try:
            value = getattr(config, name, None)
        except (AttributeError, RuntimeError):  # a per-layer field, readable only through the layer configs
            continue
        if isinstance(value, PretrainedConfig):
            kwargs[name] = type(value)(**tiny_fields(value, extra.get(name)))
        elif isinstance(value, list) and isinstance(layers, int) and len(value) == layers != LAYERS:
            # Per-layer lists: regenerated from the new depth where the config can, else cut to it.
            kwargs[name] = None if field.default is None else value[:LAYERS]
        elif name in SPECIAL_IDS and (isinstance(value, list) or (isinstance(value, int) and value >= VOCAB)):
            kwargs[name] = SPECIAL_IDS[name]
    kwargs.update({name: value for name, value in extra.items() if not isinstance(kwargs.get(name), PretrainedConfig)})
    return kwargs


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A config of `model_type` with small sizes and post-processing fields that move the logits."""
    fields = tiny_fields(AutoConfig.for_model(model_type), EXTRA.get(model_type))
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def build(config: PretrainedConfig) -> torch.nn.Module:
    """The tiny random causal LM, in float32 and eval mode (no dropout)."""
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise RuntimeError(f"{config.model_type}: the tiny config still has {size} parameters; shrink it in EXTRA.")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids `[2, 7]` (no special ids) and a mask that left-pads the first row by two tokens."""
    vocab = min(VOCAB, model.get_input_embeddings().num_embeddings)
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


@torch.no_grad()
def both_logits(model: torch.nn.Module, config: PretrainedConfig, ids: torch.Tensor, mask: torch.Tensor):
    """`(model's own output, oprd's captured final normed state, oprd's logits from it)` on one batch.

    The transforms come from the config oprd loads at start-up, which for some multimodal families (Qwen 3.5, Llama 4)
    is not `model.config`: their causal LM is the text model alone.
    """
    own = model(**forward_inputs(ids, mask), output_hidden_states=True)
    norm = HiddenCapture(model, [NORM], stop_early=False).run(ids, mask)[NORM]
    config = with_model_logit_transforms(TokenLossConfig(), config)
    head = Head.of(model.get_output_embeddings())
    logits = head_logits(norm, head.weight, head.bias, config, own.logits.shape[-1])
    return own, norm, logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_head_is_exact_or_refused(model_type):
    if reason := skip_reason(model_type):
        pytest.skip(reason)
    try:
        config = tiny_config(model_type)
    except Exception:
        if model_type not in UNSUPPORTED_HEADS:
            raise
        config = TypeOnly(model_type)  # a drafter's config cannot stand alone; the check reads only the type
    if model_type in UNSUPPORTED_HEADS:
        with pytest.raises(ValueError, match=f"model type {model_type!r}"):
            check_head_reproducible(config)
        assert_not_reproduced(config)
        return
    check_head_reproducible(config)
    try:
        model = build(config)
    except RuntimeError as err:  # the family's own code cannot start from a tiny config in this transformers version
        if "tiny config still has" in str(err):
            raise
        pytest.skip(f"{model_type} does not build from a tiny config in transformers {transformers.__version__}: {err}")
    own, norm, logits = both_logits(model, config, *inputs(model))
    # The same normed state through the same head: only the order of a few elementwise float32 roundings (scale,
    # soft-cap; u = 6e-8 each, relative to the logit) may differ, so rtol 1e-5 (~80 u); atol for logits near zero.
    torch.testing.assert_close(logits, own.logits.float(), rtol=1e-5, atol=1e-6)
    if model_type not in HIDDEN_STATES_NOT_NORMED:
        torch.testing.assert_close(norm, own.hidden_states[-1], rtol=0, atol=0)
    if model_type in HEAD_RULES:  # the rule changes this config's logits, so the test above is not vacuous
        head = Head.of(model.get_output_embeddings())
        bare = head_logits(norm, head.weight, head.bias, TokenLossConfig(), logits.shape[-1])
        assert not torch.allclose(bare, own.logits.float(), rtol=1e-3, atol=1e-4)


@dataclasses.dataclass
class TypeOnly:
    """A stand-in config that carries only a model type."""

    model_type: str


def assert_not_reproduced(config) -> None:
    """A refused family that runs here really is out of reach: oprd's path fails on it or gets other logits."""
    if not isinstance(config, PretrainedConfig):
        return
    try:
        model = build(config)
        ids, mask = inputs(model)
        with torch.no_grad():
            own = model(**forward_inputs(ids, mask)).logits.float()
    except Exception:  # the family does not build or run alone here: nothing to compare with
        return
    try:
        _, _, logits = both_logits(model, config, ids, mask)
    except (ValueError, RuntimeError, TypeError):  # oprd cannot find its layers or norm, or cannot apply its head
        return
    same = logits.shape == own.shape and torch.allclose(logits, own, rtol=1e-5, atol=1e-6)
    assert not same, f"oprd reproduces {config.model_type}: remove it from UNSUPPORTED_HEADS"


def test_opt_is_refused_when_its_head_reads_a_projection():
    projected = tiny_config("opt", word_embed_proj_dim=32)
    post_ln = tiny_config("opt", do_layer_norm_before=False)
    for config in (projected, post_ln):
        with pytest.raises(ValueError, match="'opt'.*project_out"):
            check_head_reproducible(config)
        assert_not_reproduced(config)


@pytest.mark.parametrize("field, value", [("logits_scaling", 4.0), ("final_logit_softcapping", 30.0)])
def test_custom_code_that_post_processes_logits_is_refused(field, value):
    remote = tiny_config("llama")
    remote.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    check_head_reproducible(remote)  # custom code without post-processing fields: the bare head
    setattr(remote, field, value)
    with pytest.raises(ValueError, match=f"'llama'.*{field}"):
        check_head_reproducible(remote)
    unknown = TypeOnly("my_custom_lm")
    setattr(unknown, field, value)
    with pytest.raises(ValueError, match=f"'my_custom_lm'.*{field}"):
        check_head_reproducible(unknown)
    unknown = TypeOnly("my_custom_lm")
    unknown.logits_scaling = 1.0  # a neutral factor post-processes nothing
    check_head_reproducible(unknown)


def test_model_logit_transforms_follow_each_family():
    assert model_logit_transforms(tiny_config("granite")) == (0.25, None)  # divides by logits_scaling = 4
    assert model_logit_transforms(tiny_config("hyperclovax")) == (4.0, None)  # multiplies by it
    assert model_logit_transforms(tiny_config("minicpm3")) == (0.25, None)  # hidden / (hidden_size / dim_model_base)
    assert model_logit_transforms(tiny_config("gemma2")) == (None, 0.1)
    assert model_logit_transforms(tiny_config("gemma4")) == (None, 0.1)  # read from the text config
    assert model_logit_transforms(tiny_config("gemma3")) == (None, None)  # its multimodal forward never caps
    assert model_logit_transforms(tiny_config("mpt")) == (None, None)  # transformers' MPT ignores logit_scale
    assert model_logit_transforms(tiny_config("llama")) == (None, None)


def test_student_and_teacher_must_post_process_alike():
    check_same_logit_transforms(tiny_config("llama"), tiny_config("qwen3"))
    check_same_logit_transforms(tiny_config("gemma2"), tiny_config("gemma2"))
    with pytest.raises(ValueError, match="'llama'.*'gemma2'"):
        check_same_logit_transforms(tiny_config("llama"), tiny_config("gemma2"))


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"), reason="older transformers know fewer families than the tables"
)
def test_family_tables_name_transformers_families():
    named = set(HEAD_RULES) | set(UNSUPPORTED_HEADS) | set(FINAL_NORM_BY_FAMILY) | set(EXTRA)
    assert named <= set(FAMILIES), sorted(named - set(FAMILIES))
    assert not set(HEAD_RULES) & set(UNSUPPORTED_HEADS)
