"""Capture hidden states with forward hooks on decoder layers, and stop a forward pass early.

Shape legend:
    b  batch
    t  tokens
    d  hidden width

A *capture point* is a decoder-layer index (negative allowed, resolved against the model's depth) or `"norm"`, the
final normed hidden state: the last decoder layer's output is taken before the final norm, so a loss on it never trains
that norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from oprd.models.layers import decoder, find_final_norm, find_layers

Point = int | str
NORM = "norm"


class _StopForward(Exception):
    """Raised by the deepest hook to end a truncated forward pass."""


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
                decoder(self.model)(**forward_inputs(input_ids, attention_mask))
            return self.collected(states)

    def collected(self, states: dict[Point, Tensor]) -> dict[Point, Tensor]:
        """A copy of what the hooks stored, refusing a pass in which one of them did not fire."""
        missing = [p for p in self.points if p not in states]
        if missing:
            raise RuntimeError(f"Hooks on {missing} did not fire; check `layers_path`.")
        return dict(states)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_forward_states(
    model: nn.Module, points: Sequence[Point], layers_path: str | None, input_ids: Tensor, attention_mask: Tensor
) -> dict[Point, Tensor]:
    """Hidden states of a sharded model: a whole forward through the root, with the LM head on one position only.

    FSDP2 gathers and frees weights in forward hooks of each unit; the early exit of `HiddenCapture` (an exception
    raised in a hook) would skip those of the root. Costs the layers after the deepest capture point: none for the
    default `uniform` map, whose deepest pair is the last layer.
    """
    capture = HiddenCapture(model, points, layers_path, stop_early=False)
    with capture.capture() as states:
        model(**forward_inputs(input_ids, attention_mask), logits_to_keep=1)
        return capture.collected(states)


def hidden_states(
    model: nn.Module, points: Sequence[Point], layers_path: str | None, input_ids: Tensor, attention_mask: Tensor
) -> dict[Point, Tensor]:
    """Hidden states at `points`, `[b, t, d]` each: a pass that stops after the deepest point, or a whole forward
    when the model is sharded (see `full_forward_states`)."""
    if is_sharded(model):
        return full_forward_states(model, points, layers_path, input_ids, attention_mask)
    return HiddenCapture(model, points, layers_path).run(input_ids, attention_mask)


def forward_inputs(input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor | bool]:
    """Keyword arguments of a cache-less forward pass over left-padded sequences.

    Positions follow the attention mask, as in `generate`, so left padding does not shift them.
    """
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}


def _depth_key(point: Point) -> float:
    return float("inf") if point == NORM else float(point)
