"""Which student layer learns which teacher layer.

A layer map is a list of `(student_point, teacher_point)` pairs, where a point is a decoder-layer index or
`"norm"` (the final normed state). Named maps:

* `uniform` (default): every student layer i -> teacher layer round(i * (L_T - 1) / (L_S - 1)) (OPRD paper).
* `all`: `uniform` plus the final normed states (`norm -> norm`).
* `last`: the last decoder layers only.
* `norm`: the final normed states only.
* `pruned`: for a depth-pruned student, each kept layer -> the last teacher layer of the block it replaces
  (`oprd.models.prune.pruned_layer_map`).
* `pruned_norm`: `pruned` plus the final normed states, so that a hidden-state objective also trains the student's
  final norm (which `pruned` never reaches) toward the state the teacher's LM head reads.

Explicit pairs (`[[0, 1], [1, 3], ["norm", "norm"]]`) override them; lists of pairs survive LightningCLI's YAML
round-trip, dicts with int keys would not (their keys come back as strings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from oprd.models.capture import NORM, Point, resolve_point
from oprd.models.prune import pruned_layer_map

NamedMap = Literal["uniform", "all", "last", "norm", "pruned", "pruned_norm"]
LayerMapSpec = str | Sequence[Sequence[int | str]]
NAMED_MAPS: tuple[str, ...] = get_args(NamedMap)


def uniform_map(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer round(i * (L_T - 1) / (L_S - 1)); a 1-layer student maps to the last."""
    if num_student == 1:
        return [(0, num_teacher - 1)]
    return [(i, round(i * (num_teacher - 1) / (num_student - 1))) for i in range(num_student)]


def resolve_layer_map(
    spec: LayerMapSpec, num_student: int, num_teacher: int, kept_layers: list[int] | None = None
) -> list[tuple[Point, Point]]:
    """Turn a named map or explicit pairs into validated `(student, teacher)` points.

    Args:
        kept_layers: the teacher layers a depth-pruned student kept (needed by `pruned`).

    Raises:
        ValueError: naming the bad entry and the valid range, before any weights are loaded.
    """
    if isinstance(spec, str):
        if spec == "uniform":
            return list(uniform_map(num_student, num_teacher))
        if spec == "all":
            return [*uniform_map(num_student, num_teacher), (NORM, NORM)]
        if spec == "last":
            return [(num_student - 1, num_teacher - 1)]
        if spec == "norm":
            return [(NORM, NORM)]
        if spec in ("pruned", "pruned_norm"):
            if kept_layers is None:
                raise ValueError(f"layer_map {spec!r} needs a pruned student (`student.keep_layers` or `keep_every`).")
            norm = [(NORM, NORM)] if spec == "pruned_norm" else []
            return [*pruned_layer_map(kept_layers, num_teacher), *norm]
        raise ValueError(
            f"Unknown layer map {spec!r}; use one of {', '.join(NAMED_MAPS)} or a list of [student, teacher]."
        )
    pairs = []
    for number, pair in enumerate(spec):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"layer_map entry {number} is {pair!r}; each entry must be a pair [student_layer, teacher_layer], "
                "e.g. [[0, 1], [1, 3], ['norm', 'norm']]."
            )
        student = resolve_point(pair[0], num_student, "student")
        teacher = resolve_point(pair[1], num_teacher, "teacher")
        pairs.append((student, teacher))
    if not pairs:
        raise ValueError("layer_map is empty; give at least one [student_layer, teacher_layer] pair or 'uniform'.")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"layer_map repeats a pair: {pairs}.")
    return pairs
