import pytest
import torch

from oprd.objective.layer_map import resolve_layer_map, uniform_map
from oprd.objective.projectors import Projectors, pair_label


def test_uniform_map_follows_the_paper_formula():
    assert uniform_map(15, 30) == [(i, round(i * 29 / 14)) for i in range(15)]
    assert uniform_map(2, 4) == [(0, 0), (1, 3)]
    assert uniform_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert uniform_map(1, 6) == [(0, 5)]


def test_named_and_explicit_maps():
    assert resolve_layer_map("last", 2, 4) == [(1, 3)]
    assert resolve_layer_map("all", 2, 4) == [(0, 0), (1, 3), ("norm", "norm")]
    assert resolve_layer_map("norm", 2, 4) == [("norm", "norm")]
    assert resolve_layer_map([[0, 1], [-1, -1], ["norm", "norm"]], 2, 4) == [(0, 1), (1, 3), ("norm", "norm")]


def test_a_pruned_map_with_the_final_normed_states():
    # Kept teacher layers 0, 2, 3 of 6: each student layer learns the last teacher layer of the block it replaces.
    assert resolve_layer_map("pruned", 3, 6, kept_layers=[0, 2, 3]) == [(0, 1), (1, 2), (2, 5)]
    with_norm = resolve_layer_map("pruned_norm", 3, 6, kept_layers=[0, 2, 3])
    assert with_norm == [(0, 1), (1, 2), (2, 5), ("norm", "norm")]
    with pytest.raises(ValueError, match="layer_map 'pruned_norm' needs a pruned student"):
        resolve_layer_map("pruned_norm", 3, 6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("every", "Unknown layer map 'every'"),
        ([[0, 1, 2]], "entry 0 is \\[0, 1, 2\\]; each entry must be a pair"),
        (["ab"], "must be a pair"),
        ([[2, 0]], "Layer 2 is out of range for the student, which has 2"),
        ([[0, 9]], "Layer 9 is out of range for the teacher, which has 4"),
        ([], "layer_map is empty"),
        ([[0, 1], [0, 1]], "repeats a pair"),
    ],
)
def test_bad_layer_maps_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_map(spec, 2, 4)


def test_projectors_identity_when_widths_match_and_checkpointed():
    pairs = [(0, 0), ("norm", "norm")]
    same = Projectors(pairs, 8, 8)
    x = torch.randn(2, 3, 8)
    out = same({0: x, "norm": x})
    assert torch.equal(out[pair_label((0, 0))], x)
    wider = Projectors(pairs, 8, 16)
    assert out.keys() == wider({0: x, "norm": x}).keys()
    assert wider.proj["0_0"].weight.shape == (16, 8) and wider.proj["0_0"].bias is None
    assert set(wider.state_dict()) == {"proj.0_0.weight", "proj.norm_norm.weight"}
