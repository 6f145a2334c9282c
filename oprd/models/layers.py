"""Where a causal LM keeps its decoder layers and final norm, and the config of a model that keeps fewer layers.

One lookup serves capture (hooks), depth pruning and freezing, so a model that can be captured can also be pruned.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

LAYER_NAMES = ("layers", "h", "blocks")
"""Attribute names of the decoder-layer list: Llama/Qwen/Mistral/Gemma `layers`, GPT-2 `h`, some others `blocks`."""
NORM_NAMES = ("norm", "ln_f", "final_layernorm")
"""Attribute names of the final norm after the last decoder layer."""


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder of a causal LM (`LlamaModel` inside `LlamaForCausalLM`): layers and final norm, no LM head."""
    if isinstance(model, PreTrainedModel):
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
        if base is None:
            base = getattr(model, model.base_model_prefix, model)
        return base
    return model


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
    base = decoder(model)
    for name in LAYER_NAMES:
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}; give their dotted path in the config "
        "(e.g. `layers_path: model.layers`)."
    )


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
    """The final norm applied after the last decoder layer (`model.norm`, `transformer.ln_f`)."""
    base = decoder(model)
    for name in NORM_NAMES:
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
