"""GKD-style on/off-policy mixing (lambda, sequence-level KD) and sampled evaluation (Avg@k, Best@k)."""

from __future__ import annotations

import csv

import pytest
import torch

from oprd.data import PromptDataModule
from oprd.evaluation.scoring import sampled_accuracy
from oprd.rollout import RolloutConfig
from oprd.rollout.sampling import Rollout, rollout_seed
from tests.helpers import make_module, trainer


def _fit_kinds(tmp_path, steps: int, **rollout) -> tuple[list[float], object]:
    module = make_module(rollout=RolloutConfig(max_new_tokens=8, **rollout))
    calls = {"student": 0, "teacher": 0}
    original = module.distiller.sample

    def sample(prompts, config, seed=None, model=None):
        calls["teacher" if model is module.pair.teacher else "student"] += 1
        return original(prompts, config, seed=seed, model=model)

    module.distiller.sample = sample
    from lightning.pytorch.loggers import CSVLogger

    fit = trainer(tmp_path, max_steps=steps, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    fit.fit(module, PromptDataModule(batch_size=2))
    (metrics,) = tmp_path.glob("**/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    kinds = [float(r["train/on_policy"]) for r in rows if r.get("train/on_policy")]
    return kinds, calls


def test_lambda_is_the_fraction_of_on_policy_steps_and_each_step_is_logged(tmp_path):
    kinds, calls = _fit_kinds(tmp_path / "mixed", 40, lmbda=0.5)
    assert len(kinds) == 40 and 0.3 <= sum(kinds) / 40 <= 0.7  # 40 seeded coin flips at 0.5
    assert calls == {"student": sum(kinds), "teacher": 0}  # off-policy steps read the data's responses
    again, _ = _fit_kinds(tmp_path / "again", 40, lmbda=0.5)
    assert again == kinds  # the choice derives from the step's seed: a resumed run makes the same one


def test_sequence_level_kd_samples_off_policy_responses_from_the_teacher(tmp_path):
    kinds, calls = _fit_kinds(tmp_path, 6, lmbda=0.0, seq_kd=True)
    assert kinds == [0.0] * 6 and calls == {"student": 0, "teacher": 6}


def test_off_policy_responses_come_from_the_data(tmp_path):
    module = make_module(rollout=RolloutConfig(max_new_tokens=8, lmbda=0.0))
    batch = {"prompt": ["What is 1 plus 2?", "What is 3 plus 4?"], "answer": ["3", "7"]}
    batch["response"] = ["1 + 2 = 3.", "3 + 4 = 7."]
    roll, on_policy = module.distiller.responses(batch, seed=0)
    assert not on_policy
    texts = module.pair.tokenizer.batch_decode(roll.responses(), skip_special_tokens=True)
    assert texts == batch["response"]
    assert int(roll.response_mask[0].sum()) == len(module.pair.tokenizer("1 + 2 = 3.")["input_ids"]) + 1  # and EOS
    with pytest.raises(ValueError, match='a prompt has no "response"'):
        module.distiller.responses({**batch, "response": [None, None]}, seed=0)


def test_avg_at_k_and_best_at_k_on_a_fixed_sampler(monkeypatch):
    module = make_module(eval={"samples": 3})
    # Two prompts, three samples each: prompt 1 gets 1 of 3 right, prompt 2 none.
    texts = ["3", "5", "x", "7 is not it", "no", "8"]
    monkeypatch.setattr(module.distiller, "sample", lambda prompts, config, seed=None: Rollout(
        torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), torch.ones(6, 1), 0))  # fmt: skip
    monkeypatch.setattr(module.pair, "decode", lambda roll: texts)
    metrics = sampled_accuracy(module.distiller, ["What is 1 plus 2?", "What is 3 plus 4?"], ["3", "9"], 3)
    assert metrics["accuracy_avg@3"] == pytest.approx(1 / 6) and metrics["accuracy_best@3"] == pytest.approx(0.5)


def test_every_rank_takes_the_same_branch_whatever_its_sampling_seed():
    # A sharded student generates in lockstep across ranks: the on/off-policy coin must not depend on the rank.
    module = make_module(rollout=RolloutConfig(max_new_tokens=4, lmbda=0.5))
    batch = {"prompt": ["What is 1 plus 2?"], "answer": ["3"], "response": ["1 + 2 = 3."]}
    for batch_idx in range(12):
        coin = rollout_seed(0, 0, batch_idx, rank=0)
        branches = {
            module.distiller.responses(batch, rollout_seed(0, 0, batch_idx, rank), coin)[1] for rank in range(4)
        }
        assert len(branches) == 1
    assert {module.distiller.responses(batch, seed, None)[1] for seed in range(12)} == {True, False}  # the coin is real


def test_one_coin_per_optimizer_step_under_gradient_accumulation(tmp_path, monkeypatch):
    # GKD picks on- or off-policy per update: both micro-batches of an accumulated step must take the same kind.
    module = make_module(rollout=RolloutConfig(max_new_tokens=4, lmbda=0.5))
    kinds: dict[int, list[bool]] = {}
    original = module.distiller.responses

    def recording(batch, seed, coin, lmbda=None):
        roll, on_policy = original(batch, seed, coin, lmbda)
        kinds.setdefault(module.trainer.global_step, []).append(on_policy)
        return roll, on_policy

    monkeypatch.setattr(module.distiller, "responses", recording)
    trainer(tmp_path, max_steps=8, accumulate_grad_batches=2).fit(module, PromptDataModule(batch_size=2))
    assert sorted(kinds) == list(range(8)) and all(len(step) == 2 for step in kinds.values())
    assert all(step[0] == step[1] for step in kinds.values()), kinds
    assert {step[0] for step in kinds.values()} == {True, False}  # the coin is real


def test_a_warm_start_off_policy_turns_on_policy_on_schedule_in_one_run(tmp_path):
    kinds, calls = _fit_kinds(tmp_path, 5, lmbda=1.0, lmbda_start=0.0, lmbda_steps=3, lmbda_schedule="step")
    assert kinds == [0.0, 0.0, 0.0, 1.0, 1.0] and calls == {"student": 2, "teacher": 0}
