"""The Distiller does a step's work without a Trainer; calibration takes plain arguments."""

from __future__ import annotations

import torch

from oprd.distiller import Distiller
from oprd.models import ModelSpec
from oprd.objective.bridge import BridgeConfig
from oprd.objective.calibration import calibrate_projectors
from oprd.objective.objective import ObjectiveConfig
from oprd.objective.select import SelectProjectors
from oprd.rollout import RolloutConfig
from tests.helpers import STUDENT, TEACHER


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
