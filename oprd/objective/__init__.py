"""The distillation objective: layer maps (`layer_map`), learned projections (`projectors`) and the `Objective`
that mixes hidden-state and token-space terms into `LossTerms`."""

from oprd.objective.layer_map import LayerMapSpec, resolve_layer_map
from oprd.objective.objective import EVAL_KL, Heads, LossTerms, Objective
from oprd.objective.projectors import Projectors, pair_label

__all__ = [
    "EVAL_KL",
    "Heads",
    "LayerMapSpec",
    "LossTerms",
    "Objective",
    "Projectors",
    "pair_label",
    "resolve_layer_map",
]
