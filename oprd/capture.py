"""Capture hidden states with forward hooks on decoder layers, and stop a forward pass early.

Shape legend:
    b  batch
    t  tokens
    d  hidden width

A *capture point* is a decoder-layer index (negative allowed, resolved against the model's depth) or `"norm"`, the
final normed hidden state: a loss on the last layer's raw output never trains the final norm (DESIGN.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

Point = int | str
NORM = "norm"


class _StopForward(Exception):
    """Raised by the deepest hook to end a truncated forward pass."""


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
    for name in ("layers", "h", "blocks"):
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}; give their dotted path in the config "
        "(e.g. `layers_path: model.layers`)."
    )


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm applied after the last decoder layer (`model.norm`, `transformer.ln_f`)."""
    base = decoder(model)
    for name in ("norm", "ln_f", "final_layernorm"):
        found = getattr(base, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(f"Cannot find the final norm of {type(model).__name__}; capture decoder layers instead of 'norm'.")


def resolve_point(point: Point, num_layers: int, who: str = "model") -> Point:
    """Normalise a capture point: negative layer indices count from the end; `"norm"` stays as it is."""
    if isinstance(point, str):
        if point == NORM:
            return NORM
        try:
            point = int(point)
        except ValueError:
            raise ValueError(f"Capture point {point!r} for the {who} must be a layer index or 'norm'.") from None
    if not -num_layers <= point < num_layers:
        raise ValueError(
            f"Layer {point} is out of range for the {who}, which has {num_layers} decoder layers "
            f"(valid: {-num_layers}..{num_layers - 1}, or 'norm')."
        )
    return point % num_layers


def _hidden(output) -> Tensor:
    # Decoder layers return a tensor in transformers >= 4.54 and a tuple (hidden, ...) before.
    return output if isinstance(output, Tensor) else output[0]


class HiddenCapture:
    """Hooks that store chosen hidden states of one forward pass, keyed by capture point.

    Storage is idempotent (a layer re-run by activation checkpointing overwrites its entry) and the stored tensors
    are released when the `capture` context exits, so nothing accumulates across steps.

    Args:
        model: a causal LM (or its base decoder).
        points: layer indices (negative allowed) and/or `"norm"`.
        layers_path: dotted path to the decoder layers, when they cannot be found automatically.
        stop_early: end the forward right after the deepest captured point: no later layers, no LM head.
    """

    def __init__(
        self, model: nn.Module, points: Sequence[Point], layers_path: str | None = None, stop_early: bool = True
    ):
        self.model = model
        self.layers = find_layers(model, layers_path)
        self.points = sorted({resolve_point(p, len(self.layers)) for p in points}, key=_depth_key)
        self.stop_early = stop_early
        self.states: dict[Point, Tensor] = {}

    @property
    def deepest(self) -> Point:
        return self.points[-1]

    def _store(self, point: Point, stop: bool):
        def hook(module, args, output):
            self.states[point] = _hidden(output)
            if stop:
                raise _StopForward

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[Point, Tensor]]:
        """Register the hooks, yield the dict that fills during the forward, then remove hooks and release states."""
        handles = []
        try:
            for point in self.points:
                stop = self.stop_early and point == self.deepest
                module = find_final_norm(self.model) if point == NORM else self.layers[point]
                handles.append(module.register_forward_hook(self._store(point, stop)))
            yield self.states
        finally:
            for handle in handles:
                handle.remove()
            self.states = {}

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> dict[Point, Tensor]:
        """One forward pass through the base decoder (never the LM head); returns point -> `[b, t, d]`."""
        with self.capture() as states:
            with contextlib.suppress(_StopForward):
                # Positions follow the attention mask, as in `generate`, so left padding does not shift them.
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
                decoder(self.model)(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
            missing = [p for p in self.points if p not in states]
            if missing:
                raise RuntimeError(f"Hooks on {missing} did not fire; check `layers_path`.")
            return dict(states)


def _depth_key(point: Point) -> float:
    return float("inf") if point == NORM else float(point)


@torch.no_grad()
def count_layer_calls(model: nn.Module, fn, layers_path: str | None = None) -> list[int]:
    """How many times each decoder layer ran during `fn()`: used to prove truncation in tests and benchmarks."""
    layers = find_layers(model, layers_path)
    counts = [0] * len(layers)

    def counter(i):
        def hook(module, args):
            counts[i] += 1

        return hook

    handles = [layer.register_forward_pre_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return counts
