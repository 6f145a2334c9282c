import pytest
import torch

from oprd.data import PromptDataModule
from oprd.training.guard import describe_term, nonfinite_grads, nonfinite_term
from tests.helpers import make_module, trainer


def poison_teacher(module, at_call: int):
    """Make the teacher's states NaN on one training pass, as a numerically broken step would."""
    original, calls = module.pair.teacher_states, {"n": 0}

    def teacher_states(roll, points):
        states = original(roll, points)
        calls["n"] += 1
        if calls["n"] == at_call:
            states = {k: torch.full_like(v, float("nan")) for k, v in states.items()}
        return states

    module.pair.teacher_states = teacher_states


def test_nonfinite_loss_stops_with_the_step_and_term_and_saves_the_last_good_state(tmp_path):
    module = make_module()
    poison_teacher(module, at_call=2)
    with pytest.raises(FloatingPointError, match=r"Step 1: the hidden-state term of layer pair 0_0 .*not finite"):
        trainer(tmp_path, max_steps=3).fit(module, PromptDataModule(batch_size=2))
    (saved,) = tmp_path.glob("nonfinite-step1-last-good.ckpt")
    state = torch.load(saved, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    weight = module.objective.projectors.proj["1_3"].weight
    assert torch.equal(state["objective.projectors.proj.1_3.weight"], weight)


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
    module = make_module(guard={"nonfinite": "skip"})
    poison_teacher(module, at_call=2)
    trainer(tmp_path, max_steps=3).fit(module, PromptDataModule(batch_size=2))
    assert module.guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_helpers_name_what_went_wrong():
    assert nonfinite_term({"hidden/0_0": torch.tensor(1.0), "token": torch.tensor(float("inf"))}) == "token"
    assert nonfinite_term({"hidden": torch.tensor(2.0)}) is None
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    assert nonfinite_grads(layer.named_parameters()) == ["weight"]
    assert describe_term("hidden/3_7") == "the hidden-state term of layer pair 3_7 (student 3 -> teacher 7)"
