"""Depth-pruned students: a copy of the teacher that keeps a subset of its decoder layers.

Initialising the student from the teacher's own layers (rather than at random) is the usual starting point for
depth compression; the distillation then has to teach the kept layers to stand in for the dropped ones.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import nn

from oprd.models.layers import find_layers, keep_layer_fields, set_layers


def check_keep_layers(keep_layers: list[int], num_layers: int) -> list[int]:
    """Validate layer indices to keep: non-empty, integers in `[0, num_layers)`, strictly increasing.

    Returns:
        the indices as a list of ints.
    """
    keep = list(keep_layers)
    if not keep:
        raise ValueError("keep_layers is empty: keep at least one decoder layer.")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"keep_layers must be integers, got {keep}.")
    outside = [i for i in keep if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"keep_layers {outside} out of range: the model has layers 0..{num_layers - 1}.")
    if len(set(keep)) != len(keep):
        duplicates = sorted({i for i in keep if keep.count(i) > 1})
        raise ValueError(f"keep_layers repeats {duplicates}: each teacher layer can be kept once.")
    if keep != sorted(keep):
        raise ValueError(f"keep_layers must be in increasing order (layers run in teacher order), got {keep}.")
    return keep


def every_kth(num_layers: int, k: int, offset: int = 0) -> list[int]:
    """Layers `offset, offset + k, offset + 2k, ...` below `num_layers`; `every_kth(30, 2)` keeps 0, 2, ..., 28."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if not 0 <= offset < num_layers:
        raise ValueError(f"offset must be in 0..{num_layers - 1}, got {offset}.")
    return list(range(offset, num_layers, k))


def prune_layers(model: nn.Module, keep_layers: list[int], layers_path: str | None = None) -> nn.Module:
    """A new model keeping only the decoder layers `keep_layers` of `model`, in order; `model` is not changed.

    The copy shares no parameter, buffer or config with the input. Each kept layer is renumbered (`layer_idx`
    of its attention, and of any submodule that stores one) so that it reads and writes its own slot of the KV
    cache in `generate`; the config follows the kept layers (`oprd.models.layers.keep_layer_fields`).
    """
    layers = find_layers(model, layers_path)
    keep = check_keep_layers(keep_layers, len(layers))
    # Pre-seeding deepcopy's memo with the dropped layers copies them as None instead of copying them at all:
    # pruning a big teacher never holds two full copies of it in memory.
    kept_set = set(keep)
    memo = {id(layer): None for i, layer in enumerate(layers) if i not in kept_set}
    student = copy.deepcopy(model, memo)
    copied = find_layers(student, layers_path)
    kept = [copied[i] for i in keep]
    set_layers(student, nn.ModuleList(kept), layers_path)
    keep_layer_fields(student.config, keep)
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    return student


def pruned_layer_map(
    keep_layers: list[int], num_teacher_layers: int, target: Literal["block_end", "same"] = "block_end"
) -> list[tuple[int, int]]:
    """Layer pairs `(student layer, teacher layer)` for a student made by `prune_layers(teacher, keep_layers)`.

    Indices are decoder-layer outputs (HF `hidden_states[i + 1]`, or a hook on `layers[i]`).

    `block_end` (default): student layer i replaces the whole block of teacher layers
    `keep_layers[i] .. keep_layers[i + 1] - 1` (the last block runs to the teacher's last layer), so its output is
    matched to the output of the block's *last* teacher layer. That teacher state is exactly what the next kept
    layer reads in the teacher, so matching it puts every kept layer back on the input distribution its weights
    were trained for, and the final kept layer feeds the final norm what the teacher's last layer would. For
    `keep_layers = 0, 2, ..., 28` of a 30-layer teacher this is student i -> teacher 2i + 1.

    `same`: student layer i -> teacher layer `keep_layers[i]`, the layer whose weights it starts from (i -> 2i
    above). That target asks the student to reproduce the state *before* the skipped layers, so their
    contribution is never learned; it is kept for ablations.

    Args:
        keep_layers: the kept teacher layers, as given to `prune_layers`.
        num_teacher_layers: decoder layers of the teacher (the last block's end).
        target: which teacher layer of each block to match.

    Returns:
        one `(student_layer, teacher_layer)` pair per kept layer.
    """
    keep = check_keep_layers(keep_layers, num_teacher_layers)
    if target == "same":
        return list(enumerate(keep))
    if target != "block_end":
        raise ValueError(f"target must be 'block_end' or 'same', got {target!r}.")
    ends = [nxt - 1 for nxt in keep[1:]] + [num_teacher_layers - 1]
    return list(enumerate(ends))
