"""Depth pruning by importance (block influence) and the on-policy fraction's schedule."""

from __future__ import annotations

import pytest
import torch

from oprd.cli.preflight import taken_from_checkpoint
from oprd.hparams import to_plain
from oprd.models import ModelSpec
from oprd.models.depth import DepthPrune, block_influence, most_influential
from oprd.models.spec import choose_depth, load_config, load_model
from oprd.rollout import RolloutConfig
from oprd.rollout.mixing import coin_seed, is_on_policy
from tests.helpers import make_module, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDLE = (1, 3)
"""Layers of the test model that pass their input through unchanged (attention and MLP outputs zeroed)."""


def model_with_idle_layers(layers: int = 5):
    model = tiny_llama(layers=layers, width=32)
    with torch.no_grad():
        for index in IDLE:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


@pytest.fixture
def idle_folder(tmp_path):
    folder = tmp_path / "idle"
    model_with_idle_layers().save_pretrained(folder)
    return folder


def test_block_influence_is_one_minus_the_cosine_between_a_layers_input_and_output(tokenizer):
    model = model_with_idle_layers()
    batch = tokenizer(["What is 3 plus 4?", "Add 10 and 2."], return_tensors="pt", padding=True)
    scores = block_influence(model, batch["input_ids"], batch["attention_mask"])
    outputs = model(**batch, output_hidden_states=True).hidden_states  # [0]: embeddings; [i]: input of layer i
    real = batch["attention_mask"].bool()
    for index in (0, 2):  # layers whose output is hidden_states[index + 1] un-normed (not the last layer)
        cos = torch.nn.functional.cosine_similarity(outputs[index][real], outputs[index + 1][real], dim=-1)
        torch.testing.assert_close(scores[index], 1 - cos.mean(), rtol=1e-5, atol=1e-6)
    for index in IDLE:  # the residual stream passes unchanged: no influence
        assert abs(float(scores[index])) < 1e-6
    assert all(float(scores[i]) > 1e-3 for i in (0, 2, 4))
    assert most_influential(scores, 3) == [0, 2, 4]


def test_most_influential_keeps_model_order_and_refuses_impossible_counts():
    assert most_influential(torch.tensor([0.1, 0.5, 0.2, 0.5]), 2) == [1, 3]
    assert most_influential(torch.tensor([0.3, 0.3, 0.1]), 1) == [0]  # a tie goes to the earlier layer
    with pytest.raises(ValueError, match="depth.num_layers must lie in 1..3"):
        most_influential(torch.tensor([0.1, 0.2, 0.3]), 4)


def test_choose_depth_drops_the_idle_layers_and_the_student_keeps_the_rest(idle_folder, tokenizer):
    spec = ModelSpec(path=str(idle_folder), depth=DepthPrune(num_layers=3, calibration_prompts=4))
    chosen = choose_depth(spec, tokenizer)
    assert chosen.keep_layers == [0, 2, 4] and chosen.depth == spec.depth
    assert choose_depth(chosen, tokenizer) is chosen  # chosen once: a resumed run does not rank again
    student = load_model(chosen, load_config(chosen, len(tokenizer)), tokenizer)
    full = model_with_idle_layers()
    assert len(student.model.layers) == 3
    for kept, original in zip(student.model.layers, [full.model.layers[i] for i in (0, 2, 4)], strict=True):
        assert torch.equal(kept.mlp.up_proj.weight, original.mlp.up_proj.weight)


def test_a_module_saves_the_layers_it_chose(idle_folder):
    spec = ModelSpec(path=str(idle_folder), depth=DepthPrune(num_layers=3, calibration_prompts=4))
    module = make_module(teacher=ModelSpec(path=str(idle_folder)), student=spec, objective={"layer_map": "pruned"})
    assert module.hparams["student"]["keep_layers"] == [0, 2, 4]
    assert len(module.student.model.layers) == 3
    assert module.objective.pairs == [(0, 1), (1, 3), (2, 4)]  # `pruned`: where each kept layer's stream resumes
    assert not module.student.model.norm.weight.requires_grad  # no term reaches the final norm


def test_pruned_norm_also_trains_the_final_norm(idle_folder):
    spec = ModelSpec(path=str(idle_folder), keep_layers=[0, 2, 4])
    module = make_module(teacher=ModelSpec(path=str(idle_folder)), student=spec, objective={"layer_map": "pruned_norm"})
    assert module.objective.pairs == [(0, 1), (1, 3), (2, 4), ("norm", "norm")]
    assert module.student.model.norm.weight.requires_grad


def test_depth_and_width_together_make_a_smaller_student(idle_folder, tokenizer):
    from oprd.models.width import WidthPrune

    spec = ModelSpec(
        path=str(idle_folder),
        depth=DepthPrune(num_layers=3, calibration_prompts=4),
        width=WidthPrune(hidden_size=16, intermediate_size=32, calibration_prompts=4),
    )
    chosen = choose_depth(spec, tokenizer)
    student = load_model(chosen, load_config(chosen, len(tokenizer)), tokenizer)
    assert len(student.model.layers) == 3 and student.config.hidden_size == 16
    teacher_params = sum(p.numel() for p in model_with_idle_layers().parameters())
    assert sum(p.numel() for p in student.parameters()) < 0.6 * teacher_params


def test_a_resumed_run_takes_the_chosen_layers_from_its_checkpoint():
    given = to_plain(ModelSpec(path="m", depth=DepthPrune(num_layers=3)))
    saved = {**given, "keep_layers": [0, 2, 4]}
    assert taken_from_checkpoint({"student": given}, {"student": saved}, "last.ckpt") == ["student"]
    other = to_plain(ModelSpec(path="m", depth=DepthPrune(num_layers=2)))
    with pytest.raises(ValueError, match="model.student"):
        taken_from_checkpoint({"student": other}, {"student": saved}, "last.ckpt")


def test_depth_settings_refuse_what_cannot_be_built():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        DepthPrune(num_layers=0)
    with pytest.raises(ValueError, match="not both"):
        ModelSpec(path="m", depth={"num_layers": 2}, keep_every=2)
    with pytest.raises(ValueError, match="keep_layers holds 2 layers but depth.num_layers is 3"):
        ModelSpec(path="m", depth={"num_layers": 3}, keep_layers=[0, 1])


def test_the_on_policy_fraction_follows_its_schedule_step_by_step():
    linear = RolloutConfig(lmbda=1.0, lmbda_start=0.0, lmbda_steps=4)
    assert [linear.lmbda_at(step) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    phases = RolloutConfig(lmbda=1.0, lmbda_start=0.0, lmbda_steps=3, lmbda_schedule="step")
    assert [phases.lmbda_at(step) for step in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert RolloutConfig(lmbda=0.5).lmbda_at(7) == 0.5 and RolloutConfig().mixes is False and linear.mixes
    # the coin depends only on the step: every rank, and a resumed run, takes the same branch
    draws = [is_on_policy(linear.lmbda_at(s), coin_seed(3, s)) for s in range(8)]
    assert draws == [is_on_policy(linear.lmbda_at(s), coin_seed(3, s)) for s in range(8)]
    assert draws[0] is False and all(draws[4:])  # fully off-policy first, fully on-policy after the ramp
    with pytest.raises(ValueError, match="lmbda_start needs lmbda_steps >= 1"):
        RolloutConfig(lmbda_start=0.0)
    with pytest.raises(ValueError, match="lmbda_start must lie in"):
        RolloutConfig(lmbda_start=1.5, lmbda_steps=2)
