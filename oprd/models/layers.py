"""Where a causal LM keeps its decoder layers and final norm, and the config of a model that keeps fewer layers.

One lookup serves capture (hooks), depth pruning and freezing, so a model that can be captured can also be pruned.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

LAYER_NAMES = ("layers", "h", "blocks")
"""Attribute names of the decoder-layer list: Llama/Qwen/Mistral/Gemma `layers`, GPT-2 `h`, some others `blocks`."""
NORM_NAMES = (
    "norm",
    "ln_f",
    "final_layernorm",
    "final_layer_norm",
    "final_norm",
    "norm_f",
    "out_norm",
    "ln_out",
    "layer_norm",
    "layernorm",
)
"""Attribute names of the final norm after the last decoder layer: Llama `norm`, GPT-2 `ln_f`, GPT-NeoX/OPT
`final_layer_norm`, RecurrentGemma `final_norm`, Mamba/MPT `norm_f`, xLSTM `out_norm`, RWKV `ln_out`, BART-style
pre-LN decoders `layer_norm`, CTRL `layernorm`. First match wins."""
FINAL_NORM_BY_FAMILY = {
    "bigbird_pegasus": "layernorm_embedding",
    "lfm2": "embedding_norm",
    "lfm2_moe": "embedding_norm",
    "lfm3": "embedding_norm",
    "qwen4_exp_text": "hyper_connection_mixer",
}
"""Families whose final norm has a name that means something else elsewhere: BigBird-Pegasus and LFM2 run their
`layernorm_embedding` / `embedding_norm` after the last layer (in BART the former normalises the embeddings), and
Qwen4-Exp folds its residual streams into the head's input through a normed `hyper_connection_mixer`."""


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder of a causal LM (`LlamaModel` inside `LlamaForCausalLM`): layers and final norm, no LM head.

    `get_decoder()` is tried first, then the base-model prefix and `model`: the first that holds the decoder layers
    wins. It is not enough alone: ModernBERT-decoder calls its LM head `decoder`, and Llama 4's prefix names an
    attribute that its causal LM does not have.
    """
    if hasattr(model, "get_base_model"):  # a peft model: the decoder is inside, its layers hold the adapters
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        return model
    candidates = [
        model.get_decoder() if hasattr(model, "get_decoder") else None,
        getattr(model, model.base_model_prefix, None),
        getattr(model, "model", None),
    ]
    for base in candidates:
        if isinstance(base, nn.Module) and _layer_list(base) is not None:
            return base
    return next((base for base in candidates if isinstance(base, nn.Module)), model)


def _layer_list(base: nn.Module) -> nn.ModuleList | None:
    """The first attribute of `base` named in `LAYER_NAMES` that is a `ModuleList`."""
    for name in LAYER_NAMES:
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    return None


def find_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder layers of `model`, from a dotted `path` (e.g. `model.layers`) or found through the model.

    Works for Llama, Qwen2/3, Mistral and Gemma-style `model.model.layers` and GPT-2-style `transformer.h`.
    """
    if path:
        try:
            found = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"No module at layers path {path!r} in {type(model).__name__}: {err}") from err
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"{path!r} in {type(model).__name__} is a {type(found).__name__}, not a ModuleList.")
        return found
    found = _layer_list(decoder(model))
    if found is not None:
        return found
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}; give their dotted path in the config "
        "(e.g. `layers_path: model.layers`)."
    )


def check_layer_count(model: nn.Module, path: str | None, who: str) -> None:
    """The decoder layers found must be as many as the config says: otherwise capture points would be misnamed."""
    layers = len(find_layers(model, path))
    if layers != model.config.num_hidden_layers:
        raise ValueError(f"The {who} has {layers} layers but its config says {model.config.num_hidden_layers}.")


def set_layers(model: nn.Module, layers: nn.ModuleList, path: str | None = None) -> None:
    """Replace the decoder-layer list that `find_layers(model, path)` returns."""
    current = find_layers(model, path)
    if path:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
    else:
        parent = decoder(model)
        name = next(n for n in LAYER_NAMES if getattr(parent, n, None) is current)
    setattr(parent, name, layers)


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm applied after the last decoder layer (`model.norm`, `transformer.ln_f`): the module whose
    output the LM head reads. `tests/models/test_families.py` proves the pick for every transformers causal-LM
    family."""
    base = decoder(model)
    family = getattr(getattr(model, "config", None), "model_type", None)
    names = (FINAL_NORM_BY_FAMILY[family],) if family in FINAL_NORM_BY_FAMILY else NORM_NAMES
    for name in names:
        found = getattr(base, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(f"Cannot find the final norm of {type(model).__name__}; capture decoder layers instead of 'norm'.")


def pruned_config(config: PretrainedConfig, keep: list[int]) -> PretrainedConfig:
    """A copy of `config` for a model that keeps only the decoder layers `keep` (see `keep_layer_fields`)."""
    config = copy.deepcopy(config)
    keep_layer_fields(config, keep)
    return config


def keep_layer_fields(config: PretrainedConfig, keep: list[int]) -> None:
    """Rewrite `config` in place for the kept decoder layers `keep`.

    In place because a model's submodules hold the same config object: `num_hidden_layers` and `layer_types`
    (sliding/full attention per layer, which also sizes the KV cache) must change for all of them.
    """
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
