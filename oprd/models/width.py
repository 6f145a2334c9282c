"""Width-pruned students: a copy of the teacher with fewer hidden channels, attention heads and MLP neurons.

Shape legend:
    b  calibration prompts
    t  tokens
    d  hidden width (channels of the residual stream)
    h  query heads, g query heads per key/value group, e  head dim
    i  MLP neurons

What survives is chosen by activation importance on calibration prompts, as in NVIDIA's Minitron (Muralidharan et
al., arXiv 2407.14679): a hidden channel by the mean |activation| of every norm's output in it, a query head by the
mean L2 norm of its attention output, an MLP neuron by the mean |activation| entering the down projection. Whole heads
are kept, the same number in every key/value group (all key/value heads stay, so grouped-query attention keeps its
shape). The result is a plain Hugging Face model of a smaller config: it saves, loads, generates and exports like any.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from oprd.models.layers import decoder, find_final_norm, find_layers

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose layers are laid out as oprd prunes them: q/k/v/o projections, gated MLP, RMS norms."""
NORM_WEIGHTS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class WidthPrune:
    """How far to shrink a model's width (None keeps that dimension whole)."""

    hidden_size: int | None = None
    """Hidden channels to keep (the residual stream's width: embeddings, norms, every projection's input)."""
    num_attention_heads: int | None = None
    """Query heads to keep: a multiple of the key/value heads, so each group keeps the same number."""
    intermediate_size: int | None = None
    """MLP neurons to keep in every layer."""
    calibration: str | None = None
    """Prompt source whose activations rank channels, heads and neurons (built-in name or JSONL file); None: the run's
    training prompts (`oprd` fills in `data.train`; elsewhere the built-in `arithmetic`)."""
    calibration_prompts: int = 32
    """Calibration prompts (the first of the source's training split)."""
    calibration_seed: int | None = None
    """The split of a built-in calibration source, so that it calibrates on training prompts only; None: the run's
    `data.seed` (elsewhere 0, the data's default)."""
    calibration_num_val: int | None = None
    """Held-out prompts of a built-in calibration source; None: the run's `data.num_val` (elsewhere 100)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"width.{name} must be >= 1, got {value}.")
        if self.calibration_prompts < 1:
            raise ValueError(f"width.calibration_prompts must be >= 1, got {self.calibration_prompts}.")


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def width_pruned_config(config: PretrainedConfig, prune: WidthPrune) -> PretrainedConfig:
    """The config of the pruned model, checked against the original (before any weight loads).

    Raises:
        ValueError: an unsupported family, or a size larger than the model's or that breaks its head groups.
    """
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"Width pruning supports {', '.join(FAMILIES)} models, not {config.model_type!r}; prune depth "
            "(keep_every / keep_layers) or give a smaller model."
        )
    pruned = copy.deepcopy(config)
    pruned.head_dim = head_dim(config)  # stays: heads are kept whole
    kv = config.num_key_value_heads
    for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
        value, full = getattr(prune, name), getattr(config, name)
        if value is not None and value > full:
            raise ValueError(f"width.{name} = {value} is more than the model's {full}.")
        setattr(pruned, name, full if value is None else value)
    if pruned.num_attention_heads % kv:
        raise ValueError(
            f"width.num_attention_heads = {pruned.num_attention_heads} must be a multiple of the {kv} key/value "
            f"heads (every group keeps as many query heads), e.g. {kv * max(pruned.num_attention_heads // kv, 1)}."
        )
    return pruned


@dataclass
class Importance:
    """Activation importance of what width pruning can remove."""

    channels: Tensor
    """`[d]` mean |output| of every norm, per hidden channel."""
    heads: list[Tensor]
    """Per layer `[h]` mean L2 norm of each query head's attention output."""
    neurons: list[Tensor]
    """Per layer `[i]` mean |activation| entering the down projection."""


@torch.no_grad()
def importance(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Importance:
    """Activation importance on one calibration batch (padding excluded), from forward hooks."""
    layers = find_layers(model)
    e = head_dim(model.config)
    mask = attention_mask.bool()
    tokens = mask.sum()
    channels = torch.zeros(model.config.hidden_size)
    heads = [torch.zeros(model.config.num_attention_heads) for _ in layers]
    neurons = [torch.zeros(model.config.intermediate_size) for _ in layers]

    def on_norm(module, args, output):
        channels.add_(reduce(output[mask].abs().float(), "n d -> d", "sum").cpu())

    def on_heads(i):
        def hook(module, args):
            per_head = rearrange(args[0][mask].float(), "n (h e) -> n h e", e=e).norm(dim=-1)
            heads[i].add_(reduce(per_head, "n h -> h", "sum").cpu())

        return hook

    def on_neurons(i):
        def hook(module, args):
            neurons[i].add_(reduce(args[0][mask].abs().float(), "n i -> i", "sum").cpu())

        return hook

    norms = [find_final_norm(model)]
    norms += [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    handles = [norm.register_forward_hook(on_norm) for norm in norms]
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_neurons(i)))
    try:
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Importance(channels / (tokens * len(norms)), [h / tokens for h in heads], [n / tokens for n in neurons])


def kept(scores: Tensor, k: int) -> Tensor:
    """Indices of the `k` largest scores, in their original order (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def kept_heads(scores: Tensor, keep: int, kv_heads: int) -> Tensor:
    """The `keep` query heads to keep: in each key/value group, that group's most important `keep / kv_heads`."""
    groups = rearrange(scores, "(k g) -> k g", k=kv_heads)
    per_group = keep // kv_heads
    return torch.cat([kept(group, per_group) + k * groups.shape[1] for k, group in enumerate(groups)])


def prune_width(model: nn.Module, pruned_config: PretrainedConfig, scores: Importance) -> nn.Module:
    """A new model of `pruned_config` holding the most important channels, heads and neurons of `model`."""
    config = model.config
    e = head_dim(config)
    channels = kept(scores.channels, pruned_config.hidden_size)
    rows = {}  # parameter name -> (output index, input index) to keep; None keeps a dimension whole
    for i in range(config.num_hidden_layers):
        heads = kept_heads(scores.heads[i], pruned_config.num_attention_heads, config.num_key_value_heads)
        head_rows = rearrange(heads[:, None] * e + torch.arange(e), "h e -> (h e)")
        neurons = kept(scores.neurons[i], pruned_config.intermediate_size)
        prefix = f"model.layers.{i}."
        rows[prefix + "self_attn.q_proj"] = (head_rows, channels)
        rows[prefix + "self_attn.k_proj"] = (None, channels)
        rows[prefix + "self_attn.v_proj"] = (None, channels)
        rows[prefix + "self_attn.o_proj"] = (channels, head_rows)
        rows[prefix + "mlp.gate_proj"] = (neurons, channels)
        rows[prefix + "mlp.up_proj"] = (neurons, channels)
        rows[prefix + "mlp.down_proj"] = (channels, neurons)
    state = {}
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        if module in rows:
            out_index, in_index = rows[module]
            if out_index is not None:
                tensor = tensor[out_index]
            if kind == "weight" and in_index is not None:
                tensor = tensor[:, in_index]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = tensor[:, channels]
        elif name == "model.norm.weight" or name.endswith(NORM_WEIGHTS):
            tensor = tensor[channels]
        state[name] = tensor.clone()
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the caller's RNG
        pruned = AutoModelForCausalLM.from_config(pruned_config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()
