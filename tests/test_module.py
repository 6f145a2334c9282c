import json

import pytest
import torch

from oprd.data import PromptDataModule
from oprd.evaluation.metrics import extract_answer
from oprd.evaluation.scoring import mean_by_teacher, mean_over_batches, score, weighted_scores
from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.models import ModelSpec
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig
from tests.helpers import EXACT, STUDENT, TEACHER, assert_same_state, make_module, trainer


def test_teacher_is_frozen_and_kept_out_of_optimizer_checkpoint_and_summary(tmp_path):
    module = make_module()
    teacher_params = {id(p) for p in module.pair.teacher.parameters()}
    assert not any(p.requires_grad for p in module.pair.teacher.parameters()) and not module.pair.teacher.training
    assert all(id(p) not in teacher_params for p in module.parameters())
    assert "teacher" not in dict(module.named_children())
    assert all(k.startswith(("student.", "objective.projectors.")) for k in module.state_dict())
    before = {k: v.clone() for k, v in module.pair.teacher.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(module, PromptDataModule(batch_size=2))
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & teacher_params
    assert all(torch.equal(before[k], v) for k, v in module.pair.teacher.state_dict().items())
    from lightning.pytorch.utilities.model_summary import ModelSummary

    assert "teacher" not in str(ModelSummary(module))


def test_student_learns_and_projectors_update(tmp_path):
    module = make_module(optim=OptimConfig(lr=3e-3, projector_lr=1e-2, schedule="constant"))
    # A fixed held-out batch: the hidden loss on it must fall, for the student and the projectors together.
    fixed = module.distiller.sample([f"What is {i} plus 3?" for i in range(6)], module.distiller.rollout, seed=123)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(module.distiller.distill(fixed).hidden / fixed.response_mask.sum())

    before, proj_before = held_out_loss(), module.objective.projectors.proj["1_3"].weight.clone()
    student_before = module.student.model.layers[0].mlp.up_proj.weight.clone()
    trainer(tmp_path, max_steps=8).fit(module, PromptDataModule(batch_size=2))
    assert held_out_loss() < 0.8 * before
    assert not torch.equal(proj_before, module.objective.projectors.proj["1_3"].weight)
    assert not torch.equal(student_before, module.student.model.layers[0].mlp.up_proj.weight)


class FixedRollouts(DistillModule):
    """Replays slices of one fixed rollout and records the gradient the optimizer sees."""

    def __init__(self, roll, micro: int, **kwargs):
        super().__init__(**kwargs)
        self.fixed, self.micro, self.calls, self.grads = roll, micro, 0, None
        self.distiller.sample = self.sample

    def sample(self, prompts, config, seed=None):
        from dataclasses import replace

        i = self.calls * self.micro
        self.calls += 1
        return replace(
            self.fixed,
            input_ids=self.fixed.input_ids[i : i + self.micro],
            attention_mask=self.fixed.attention_mask[i : i + self.micro],
            response_mask=self.fixed.response_mask[i : i + self.micro],
        )

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def test_gradient_accumulation_normalises_by_the_whole_step(tmp_path):
    base = make_module()
    prompts = [f"What is {i} plus {i + 1}?" for i in range(8)]
    roll = base.distiller.sample(prompts, RolloutConfig(max_new_tokens=10), seed=0)
    # Unequal response lengths (as if EOS came early) are what make per-micro-batch normalisation wrong.
    keep = (
        torch.arange(roll.input_ids.shape[1]) < roll.prompt_length + torch.tensor([1, 9, 2, 10, 3, 4, 10, 5])[:, None]
    )
    roll.response_mask *= keep
    roll.attention_mask *= keep
    grads = []
    for micro, accumulate in ((8, 1), (4, 2), (2, 4)):
        module = FixedRollouts(roll, micro, **_specs(EXACT))  # one order of the same sums vs another: float64
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate).fit(
            module, PromptDataModule(batch_size=micro)
        )
        grads.append(module.grads)
    assert len(grads[0]) > 2  # the student's and the projectors' gradients
    for other in grads[1:]:
        assert_same_state(other, grads[0], "gradient")


@pytest.mark.parametrize("kind", ["mse", "standardized_mse"])
def test_a_float64_pair_trains_in_float64_end_to_end(kind):
    """`dtype: float64` keeps the whole step in float64 (models, projectors, losses): what the exact-comparison tests
    rely on. float32 pairs keep float32 projectors and losses, whatever the float64 running moments."""
    for dtype, want in (("float32", torch.float32), (EXACT, torch.float64)):
        module = DistillModule(**_specs(dtype), objective={"hidden_loss": HiddenLossConfig(kind=kind)})
        roll = module.distiller.sample(["What is 1 plus 2?", "Hi"], RolloutConfig(max_new_tokens=6), seed=0)
        terms = module.distiller.distill(roll)
        terms.loss.backward()
        assert terms.loss.dtype == terms.pairs["1_3"].dtype == want
        grads = {p.grad.dtype for p in module.parameters() if p.grad is not None}
        assert {p.dtype for p in module.parameters()} == grads == {want}


def _specs(dtype: str = "float32"):
    return dict(
        teacher=ModelSpec(config=TEACHER, seed=1, dtype=dtype),
        student=ModelSpec(config=STUDENT, seed=2, dtype=dtype),
        tokenizer="tiny",
        rollout=RolloutConfig(max_new_tokens=10),
        optim=OptimConfig(lr=1e-3),
        max_prompt_length=64,  # the tiny models hold 256 positions
    )


def test_bad_layer_map_fails_before_weights_load(monkeypatch):
    import oprd.pair

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before validation")

    monkeypatch.setattr(oprd.pair, "load_model", no_loading)
    with pytest.raises(ValueError, match="out of range for the teacher"):
        make_module(objective={"layer_map": [[0, 7]]})


def test_validation_metrics(tmp_path):
    module = make_module()
    prompts = [f"What is {i} plus {i + 2}?" for i in range(8)]
    whole, rows = score(module.distiller, prompts, [None] * 8)
    # Answers that the student's greedy responses get right for prompts 0, 2, 4 and wrong for the others.
    answers = [extract_answer(row["response"]) if i in (0, 2, 4) else "-12345" for i, row in enumerate(rows)]
    assert None not in answers[:5:2], [row["response"] for row in rows]
    heldout = tmp_path / "heldout.jsonl"
    lines = [json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers, strict=True)]
    heldout.write_text("".join(lines))
    results = trainer(tmp_path, limit_val_batches=1.0).validate(
        module, PromptDataModule(val=str(heldout), val_batch_size=3), verbose=False
    )[0]
    for key in ("val/hidden", "val/cos/0_0", "val/cos/1_3", "val/distinct_4", "val/repetition"):
        assert key in results
    assert results["val/accuracy"] == pytest.approx(3 / 8)  # batches of 3, 3 and 2 prompts, weighted by size
    assert results["val/response_length"] == pytest.approx(float(whole["response_length"]))
    assert results["val/hidden"] > 0


def test_validation_accuracy_is_over_the_answered_prompts_and_counts_them(tmp_path):
    module = make_module()
    prompts = [f"What is {i} plus {i + 2}?" for i in range(16)]
    _, rows = score(module.distiller, prompts, [None] * 16)
    numbers = [i for i, row in enumerate(rows) if extract_answer(row["response"]) is not None]
    others = [i for i in range(16) if i not in numbers[:4]]
    assert len(numbers) >= 4, [row["response"] for row in rows]
    # 4 right, 3 wrong, 1 without an answer, spread over batches of 3, 3 and 2.
    chosen = [numbers[0], others[0], numbers[1], others[1], numbers[2], others[2], others[3], numbers[3]]
    answers = {i: extract_answer(rows[i]["response"]) for i in numbers[:4]} | {i: "-12345" for i in others[:3]}
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": prompts[i], "answer": answers.get(i)}) + "\n" for i in chosen))
    results = trainer(tmp_path, limit_val_batches=1.0).validate(
        module, PromptDataModule(val=str(heldout), val_batch_size=3), verbose=False
    )[0]
    assert results["val/accuracy"] == pytest.approx(4 / 7) and results["val/answered"] == 7


def test_held_out_means_weigh_accuracy_by_the_answered_prompts():
    batches = [
        ({"accuracy": torch.tensor(1.0), "answered": torch.tensor(2.0), "repetition": torch.tensor(0.5)}, 4),
        ({"answered": torch.tensor(0.0), "repetition": torch.tensor(0.0)}, 4),  # no answers: no accuracy
        ({"accuracy": torch.tensor(0.25), "answered": torch.tensor(4.0), "repetition": torch.tensor(1.0)}, 4),
    ]
    means = mean_over_batches(batches)
    assert means == pytest.approx({"accuracy": (2 + 1) / 6, "answered": 6, "repetition": 0.5})


def test_several_teachers_held_out_means_keep_each_teacher_and_pool_only_what_means_the_same():
    t = torch.tensor
    a = ({"accuracy": t(1.0), "answered": t(2.0), "reverse_kl": t(0.5), "hidden": t(3.0), "cos/0_0": t(0.9)}, 2)
    b = ({"accuracy": t(0.0), "answered": t(1.0), "reverse_kl": t(1.0), "hidden": t(7.0), "cos/1_3": t(0.1)}, 4)
    means = mean_by_teacher([{"default": a, "b": b}, {"b": b}], several=True)
    assert means == pytest.approx(
        {
            "accuracy": 2 / 4,  # 2 of the 4 answered prompts (2 of teacher default, 1 + 1 of b)
            "answered": 4,
            "reverse_kl": (0.5 * 2 + 1.0 * 8) / 10,
            **{"default/accuracy": 1.0, "default/answered": 2, "default/reverse_kl": 0.5},
            **{"default/hidden": 3.0, "default/cos/0_0": 0.9},
            **{"b/accuracy": 0.0, "b/answered": 2, "b/reverse_kl": 1.0, "b/hidden": 7.0, "b/cos/1_3": 0.1},
        }
    )  # the hidden terms compare each teacher's own layers: never pooled
    weighted = weighted_scores({"default": a, "b": b}, several=True)
    assert weighted["accuracy"] == (pytest.approx(2 / 3), 3) and weighted["b/hidden"] == (t(7.0), 4)
    assert weighted_scores({"default": a}, several=False) == {
        name: (a[0][name], n)
        for name, n in {"accuracy": 2, "answered": 2, "reverse_kl": 2, "hidden": 2, "cos/0_0": 2}.items()
    }


def _first_k_by_hand(response_mask: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(response_mask, dtype=torch.bool)
    for row, mask in enumerate(response_mask):
        keep[row, mask.nonzero().flatten()[:k]] = True
    return keep


def _hidden_by_hand(module, roll, keep: torch.Tensor) -> torch.Tensor:
    """mean over pairs of sum_t keep_t ||P(h_S) - h_T||^2 / d_T over sum_t keep_t, written out."""
    student, teacher = module.distiller.states(roll)
    projected, targets = module.objective.projectors(student), module.objective.projectors.targets(teacher)
    per_pair = [((projected[x] - targets[x].detach()) ** 2).mean(-1)[keep].sum() / keep.sum() for x in projected]
    return torch.stack(per_pair).mean()


def test_first_k_positions_are_normalised_by_the_tokens_they_select(tmp_path):
    # A first_k hidden loss is a mean over the k tokens it keeps per sequence, whatever the response lengths; the
    # step's denominator is the count of those tokens over all micro-batches.
    first_2 = HiddenLossConfig(positions="first_k", k=2)
    base = make_module()
    roll = base.distiller.sample(
        [f"What is {i} plus {i + 1}?" for i in range(8)], RolloutConfig(max_new_tokens=10), seed=0
    )
    keep = (
        torch.arange(roll.input_ids.shape[1]) < roll.prompt_length + torch.tensor([1, 9, 2, 10, 3, 4, 10, 5])[:, None]
    )
    roll.response_mask *= keep
    roll.attention_mask *= keep
    selected = _first_k_by_hand(roll.response_mask, 2)
    assert selected.sum() < roll.response_mask.sum() / 2  # far fewer than the response tokens: the bug's factor

    reference = DistillModule(**_specs(), objective={"hidden_loss": first_2})
    _hidden_by_hand(reference, roll, selected).backward()
    expected = [p.grad for p in reference.student.parameters() if p.grad is not None]
    for micro, accumulate in ((8, 1), (4, 2)):
        module = FixedRollouts(roll, micro, **_specs(), objective={"hidden_loss": first_2})
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate).fit(
            module, PromptDataModule(batch_size=micro)
        )
        student = [g for name, g in module.grads.items() if name.startswith("student.")]
        for got, want in zip(student, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)

    # The logged hidden term is the same mean, with a hidden term alone and next to a token term (one micro-batch).
    for token_loss in (None, TokenLossConfig()):
        module = DistillModule(**_specs(), objective={"hidden_loss": first_2, "token_loss": token_loss})
        with torch.no_grad():
            logged = module.distiller.distill(roll).metrics()["hidden"]
            torch.testing.assert_close(logged, _hidden_by_hand(module, roll, selected), rtol=1e-5, atol=1e-8)


def test_several_teachers_route_by_the_data_column_train_their_own_projectors_and_log_per_teacher(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rows = [
        {"prompt": f"What is {i} plus 2?", "answer": str(i + 2), "teacher": "b" if i % 2 else None} for i in range(8)
    ]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    val.write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    other = {"model": {"config": TEACHER, "seed": 3}, "layer_map": "last"}
    module = make_module(teachers={"b": other})
    assert {"teacher_objectives.b.projectors.proj.1_3.weight"} <= set(module.state_dict())
    before = module.teacher_objectives["b"].state_dict()["projectors.proj.1_3.weight"].clone()
    t = trainer(tmp_path, limit_val_batches=1.0, val_check_interval=2)
    t.fit(module, PromptDataModule(train=str(train), val=str(val), batch_size=4, val_batch_size=2))
    logged = t.callback_metrics
    assert {"train/loss", "train/default/loss", "train/b/loss", "train/b/hidden/1_3", "train/default/cos/0_0"} <= set(
        logged
    )
    assert not torch.equal(before, module.teacher_objectives["b"].state_dict()["projectors.proj.1_3.weight"])
    results = t.validate(module, PromptDataModule(train=str(train), val=str(val), val_batch_size=3), verbose=False)[0]
    # 2 prompts each: the shared metrics are over all 4, each teacher's over its own.
    assert {"val/reverse_kl", "val/accuracy", "val/default/reverse_kl", "val/b/cos/1_3", "val/b/accuracy"} <= set(
        results
    )
    assert results["val/answered"] == 4 and results["val/b/answered"] == 2
    mean = (results["val/default/reverse_kl"] + results["val/b/reverse_kl"]) / 2
    assert results["val/reverse_kl"] == pytest.approx(mean, rel=1e-6)
