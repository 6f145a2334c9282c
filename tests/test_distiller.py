"""The Distiller does a step's work without a Trainer; calibration takes plain arguments."""

from __future__ import annotations

import pytest
import torch

from oprd.distiller import Distiller, TeacherConfig
from oprd.models import ModelSpec
from oprd.objective.bridge import BridgeConfig
from oprd.objective.calibration import calibrate_projectors
from oprd.objective.objective import ObjectiveConfig
from oprd.objective.select import SelectProjectors
from oprd.rollout import RolloutConfig
from tests.helpers import EXACT, EXACT_RTOL, STUDENT, TEACHER, relative_error


def test_a_step_without_a_trainer_trains_the_student_and_the_projectors():
    distiller = Distiller.build(
        ModelSpec(config=TEACHER, seed=1),
        ModelSpec(config=STUDENT, seed=2),
        ObjectiveConfig(layer_map="last"),
        RolloutConfig(max_new_tokens=6),
        tokenizer="tiny",
        max_prompt_length=64,
    )
    batch = {"prompt": ["What is 1 plus 2?", "What is 3 plus 4?"], "answer": ["3", "7"], "response": [None, None]}
    roll, on_policy, lmbda = distiller.step_responses(batch, step=0, seed=0)
    assert on_policy and lmbda == 1.0 and roll.response_mask.sum() > 0
    terms = distiller.distill(roll)
    terms.loss.backward()
    assert float(terms.loss) > 0
    assert all(p.grad is not None for p in distiller.objective.projectors.parameters())
    trained = [name for name, p in distiller.student.named_parameters() if p.grad is not None]
    assert trained and not set(trained) & set(distiller.frozen)  # what the loss cannot reach stays frozen
    again, _, _ = distiller.step_responses(batch, step=0, seed=0)
    assert torch.equal(again.input_ids, roll.input_ids)  # the step's seed decides its samples


def test_calibration_reads_the_masked_rows_of_each_batch_and_stops_at_its_row_budget():
    # A student whose 4 channels are teacher channels 1, 3, 5, 7 (scaled): `select` finds them from plain states.
    teacher = torch.randn(3, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def states(prompts, number):
        calls.append((list(prompts), number))
        t = teacher[number]
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[:, :2] = False  # the prompt positions: never rows
        return {0: 2 * t[..., [1, 3, 5, 7]]}, {0: t}, mask

    projectors = SelectProjectors([(0, 0)], 4, 8, BridgeConfig(rows=12, batches=3))
    prompts = [f"p{i}" for i in range(6)]
    metrics = calibrate_projectors(projectors, states, prompts, batch_size=2, seed=0)
    assert projectors.channels("0_0").tolist() == [1, 3, 5, 7]
    assert calls == [(["p0", "p1"], 0), (["p2", "p3"], 1)]  # 6 rows a batch: the budget of 12 is met after two
    assert set(metrics) == {"select/explained/0_0", "select/cosine/0_0"}
    assert metrics["select/cosine/0_0"] > 0.99


def two_teachers(default_map="uniform", other_map=None, other_seed=1, dtype="float32") -> Distiller:
    """The tiny pair, plus teacher `b` (the same config, seed `other_seed`) beside it on the same student."""
    return Distiller.build(
        ModelSpec(config=TEACHER, seed=1, dtype=dtype),
        ModelSpec(config=STUDENT, seed=2, dtype=dtype),
        ObjectiveConfig(layer_map=default_map),
        RolloutConfig(max_new_tokens=6, num_generations=2),
        tokenizer="tiny",
        max_prompt_length=64,
        teachers={"b": TeacherConfig(ModelSpec(config=TEACHER, seed=other_seed, dtype=dtype), layer_map=other_map)},
    )


def test_each_prompt_learns_from_its_own_teacher_and_the_sums_add_up():
    # Teacher `b` is the default teacher's twin (same weights, same projector seed): routing half the prompts to it
    # must give the loss of the whole batch against one teacher, up to the order of a float64 sum.
    distiller = two_teachers(dtype=EXACT)
    assert distiller.others["b"].student is distiller.student
    prompts = {"prompt": [f"What is {i} plus 2?" for i in range(4)], "response": [None] * 4}
    roll, _, _ = distiller.step_responses(prompts, step=0, seed=0)
    names = [None, "b", "default", "b"]
    routed, whole = distiller.distill_routed(roll, names), distiller.distill(roll)
    assert relative_error(routed.loss, whole.loss) < EXACT_RTOL and torch.equal(routed.tokens, whole.tokens)
    rows_b = [2, 3, 6, 7]  # prompts 1 and 3, two generations each
    alone = distiller.others["b"].distill(roll.select(rows_b))
    metrics = routed.metrics()
    assert torch.equal(metrics["b/loss"], alone.metrics()["loss"])
    assert {"default/hidden/1_3", "b/hidden/1_3", "default/cos/1_3", "loss", "hidden"} <= set(metrics)
    # A teacher of other weights: each teacher's terms are its own, on its own prompts' rows.
    other = two_teachers(other_seed=3, dtype=EXACT)
    split = other.distill_routed(roll, names).metrics()
    assert torch.equal(split["b/loss"], other.others["b"].distill(roll.select(rows_b)).metrics()["loss"])
    assert torch.equal(split["default/loss"], other.distill(roll.select([0, 1, 4, 5])).metrics()["loss"])
    assert not torch.equal(split["b/loss"], metrics["b/loss"])


def test_another_teacher_brings_its_own_layer_map_and_keeps_what_it_reaches_trainable():
    distiller = two_teachers(default_map=[[0, 0]], other_map="last", other_seed=3)
    assert [tuple(pair) for pair in distiller.others["b"].objective.pairs] == [(1, 3)]
    # The default map alone would freeze the student's last layer; teacher b's map reads it, so it trains.
    assert not any(name.startswith("model.layers.1.") for name in distiller.frozen)
    alone = Distiller.build(
        ModelSpec(config=TEACHER, seed=1),
        ModelSpec(config=STUDENT, seed=2),
        ObjectiveConfig(layer_map=[[0, 0]]),
        tokenizer="tiny",
        max_prompt_length=64,
    )
    assert any(name.startswith("model.layers.1.") for name in alone.frozen)


def test_a_prompt_naming_an_unknown_teacher_is_refused_with_the_known_ones():
    distiller = two_teachers()
    with pytest.raises(ValueError, match=r"names 'c', which is not a teacher of this run \(model.teachers: b; leave"):
        distiller.route(["b", "c"], 2)
    with pytest.raises(ValueError, match="`default` names model.teacher"):
        Distiller.build(
            ModelSpec(config=TEACHER),
            ModelSpec(config=STUDENT),
            tokenizer="tiny",
            teachers={"default": TeacherConfig(ModelSpec(config=TEACHER))},
        )


def test_each_teachers_bridge_calibrates_on_its_own_prompts():
    distiller = Distiller.build(
        ModelSpec(config=TEACHER, seed=1),
        ModelSpec(config=STUDENT, seed=2),
        ObjectiveConfig(projector="bridge", bridge=BridgeConfig(rank=4, batches=1)),
        RolloutConfig(max_new_tokens=6),
        tokenizer="tiny",
        max_prompt_length=64,
        teachers={"b": TeacherConfig(ModelSpec(config=TEACHER, seed=3), layer_map="last")},
    )
    assert distiller.needs_calibration
    prompts = [f"What is {i} plus 2?" for i in range(6)]
    metrics = distiller.calibrate(prompts, 3, [None, "b"] * 3)
    assert {"default/bridge/cosine/0_0", "default/bridge/cosine/1_3", "b/bridge/cosine/1_3"} == {
        key for key in metrics if "/cosine/" in key
    }
    assert not distiller.needs_calibration
