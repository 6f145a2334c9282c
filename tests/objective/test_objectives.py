"""The hidden-state objective variants equal their formulas written out here: the teacher-standardised MSE with
running statistics, and the layer weightings; a warm start's weights hold for its steps, in a run and after a resume."""

from __future__ import annotations

import pytest
import torch

from oprd.data import PromptDataModule
from oprd.losses.hidden import HiddenLossConfig, hidden_standardized_mse
from oprd.losses.token import TokenLossConfig
from oprd.losses.weighting import LayerWeighting
from oprd.objective.objective import WarmStartWeights
from oprd.objective.statistics import STD_FLOOR, RunningMoments
from tests.helpers import make_module, trainer


def test_standardized_mse_is_the_error_in_units_of_the_teacher_std():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4) * torch.tensor([1.0, 10.0, 100.0, 0.1])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    std = torch.tensor([1.0, 10.0, 100.0, 0.1])
    expected = sum(
        sum(((student[b, t, d] - teacher[b, t, d]) / std[d]) ** 2 for d in range(4)) / 4
        for b in range(2)
        for t in range(5)
        if mask[b, t]
    )
    torch.testing.assert_close(hidden_standardized_mse(student, teacher, mask, std), expected)


def test_running_moments_equal_the_moments_of_everything_seen():
    torch.manual_seed(1)
    moments, seen = RunningMoments(3), []
    for _ in range(4):
        states = torch.randn(2, 6, 3) * torch.tensor([1.0, 5.0, 50.0]) + 3
        mask = torch.rand(2, 6) > 0.3
        moments.update(states, mask)
        seen.append(states[mask])
    every = torch.cat(seen).double()
    torch.testing.assert_close(moments.mean, every.mean(0))
    torch.testing.assert_close(moments.std(), every.std(0, correction=0))  # float64, like the moments
    assert moments.count == every.shape[0]
    flat = RunningMoments(3)
    flat.update(torch.tensor([[[1.0, 5.0, 10.0], [1.0, -5.0, -10.0]]]), torch.ones(1, 2))
    assert flat.std()[0] == pytest.approx(STD_FLOOR * 5.0)  # a constant dimension is floored at the median's 1%


def test_unknown_layer_weights_are_refused_with_the_valid_names():
    with pytest.raises(
        ValueError, match="Unknown layer_weights 'lates'; valid names: uniform, late, balanced, learned"
    ):
        HiddenLossConfig(layer_weights="lates")


def test_statistics_come_from_teacher_states_in_training_only():
    module = make_module(objective={"hidden_loss": HiddenLossConfig(kind="standardized_mse")})
    roll = module.distiller.sample(["What is 1 plus 2?", "What is 3 plus 4?"], module.distiller.rollout, seed=0)
    with torch.no_grad():
        module.distiller.distill(roll)  # held-out scoring: no update
    assert all(m.count == 0 for m in module.objective.moments.values())
    terms = module.distiller.distill(roll)
    terms.loss.backward()
    teacher = module.pair.teacher_states(roll, module.objective.points("teacher"))
    for label, (_, t) in zip(module.objective.projectors.labels, module.objective.pairs, strict=True):
        kept = teacher[t][roll.response_mask.bool()].double()
        moments = module.objective.moments[label]
        assert moments.count == kept.shape[0] and moments.mean.grad_fn is None  # outside the autograd graph
        torch.testing.assert_close(moments.mean, kept.mean(0))


def test_statistics_are_checkpointed_and_restored(tmp_path):
    module = make_module(objective={"hidden_loss": HiddenLossConfig(kind="standardized_mse")})
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    fit.fit(module, PromptDataModule(batch_size=2))
    path = tmp_path / "std.ckpt"
    fit.save_checkpoint(path)
    restored = type(module).load_from_checkpoint(path)
    for label, moments in module.objective.moments.items():
        for name in ("count", "mean", "m2"):
            assert torch.equal(getattr(restored.objective.moments[label], name), getattr(moments, name)), name
    assert module.objective.moments["1_3"].count > 0


@pytest.mark.parametrize("mode", ["uniform", "late", "balanced", "learned"])
def test_layer_weightings_equal_their_formulas(mode):
    sums = torch.tensor([4.0, 1.0, 10.0], requires_grad=True)
    weighting = LayerWeighting(mode, 3)
    if mode == "learned":
        with torch.no_grad():
            weighting.log_variance.copy_(torch.tensor([0.5, -1.0, 2.0]))
    value = weighting(sums, torch.tensor(7.0))
    value.backward()
    s = torch.tensor([0.5, -1.0, 2.0])
    expected_value, expected_grad = {
        "uniform": (sums.mean(), torch.full((3,), 1 / 3)),
        "late": ((1 * 4 + 2 * 1 + 3 * 10) / 6, torch.tensor([1.0, 2.0, 3.0]) / 6),
        "balanced": (sums.mean(), (5.0 / sums.detach()) / 3),  # the value of the mean, gradient rebalanced
        "learned": ((torch.exp(-s) * sums + 7 * s).mean(), torch.exp(-s) / 3),
    }[mode]
    torch.testing.assert_close(value, torch.as_tensor(expected_value, dtype=torch.float32))
    torch.testing.assert_close(sums.grad, expected_grad)


def test_learned_layer_weights_train_with_the_projectors(tmp_path):
    module = make_module(objective={"hidden_loss": HiddenLossConfig(layer_weights="learned")})
    assert any(p is module.objective.layer_weighting.log_variance for p in module.objective.parameters())
    trainer(tmp_path, max_steps=3).fit(module, PromptDataModule(batch_size=2))
    assert not torch.equal(module.objective.layer_weighting.log_variance.detach(), torch.zeros(2))


# The hidden term alone for two steps, then the forward KL alone: the recipe that puts hidden states where they are
# fastest (reference answers) and the KL where the student samples.
HIDDEN_THEN_KL = {
    "hidden_weight": 0.0,
    "token_loss": TokenLossConfig(objective="forward_kl", estimator="exact"),
    "warm_start": WarmStartWeights(steps=2, hidden_weight=1.0, token_weight=0.0),
}


def test_a_warm_start_weighs_both_computed_terms_by_the_step():
    module = make_module(objective=HIDDEN_THEN_KL)
    assert module.objective.pairs  # the hidden term is kept for the warm start, though weighted 0 after it
    roll = module.distiller.sample(["What is 1 plus 2?", "What is 3 plus 4?"], module.distiller.rollout, seed=0)
    with torch.no_grad():
        by_step = {step: module.distiller.distill(roll, step=step) for step in (0, 1, 2, 7, None)}
    hidden, token = by_step[0].hidden, by_step[0].token
    assert hidden > 0 and token > 0
    for step, terms in by_step.items():
        assert torch.equal(terms.hidden, hidden) and torch.equal(terms.token, token)  # both computed in every step
        warm = step is not None and step < 2
        assert torch.equal(terms.loss, hidden if warm else token), step
        metrics = terms.metrics()
        assert (float(metrics["hidden_weight"]), float(metrics["token_weight"])) == ((1.0, 0.0) if warm else (0, 1))


def test_the_warm_start_weights_follow_the_global_step_through_a_resume(tmp_path):
    def weights_by_step(module) -> dict[int, tuple[float, float]]:
        seen, original = {}, module.distiller.distill_routed

        def recording(roll, names, step=None):
            terms = original(roll, names, step)
            seen[step] = float(terms.hidden_weight), terms.token_weight
            return terms

        module.distiller.distill_routed = recording
        return seen

    first = make_module(objective=HIDDEN_THEN_KL)
    seen = weights_by_step(first)
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(first, PromptDataModule(batch_size=2))
    assert seen == {0: (1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, 1.0)}
    fit.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = make_module(objective=HIDDEN_THEN_KL)
    seen = weights_by_step(resumed)
    trainer(tmp_path, max_steps=5).fit(resumed, PromptDataModule(batch_size=2), ckpt_path=tmp_path / "step3.ckpt")
    assert seen == {3: (0.0, 1.0), 4: (0.0, 1.0)}
