import pytest
import torch

from oprd.losses.hidden import (
    HiddenLossConfig,
    hidden_cosine,
    hidden_loss_sums,
    hidden_mse,
    hidden_normalized_mse,
    masked_mean,
    select_positions,
)


def _batch(b=3, t=6, d=5, seed=0):
    # float64: each test checks an identity (a formula written out, micro-batches vs the whole batch), which float64
    # round-off (~1e-16 relative) leaves far inside the default tolerances of `allclose` (rtol 1e-5, atol 1e-8).
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]])
    return student, teacher, mask


def test_mse_matches_the_oprd_formula_written_out():
    s, t, m = _batch()
    expected = sum(((s[i, j] - t[i, j]) ** 2).sum() / s.shape[-1] for i in range(3) for j in range(6) if m[i, j])
    assert torch.allclose(hidden_mse(s, t, m), expected)


def test_cosine_and_normalized_mse_written_out():
    s, t, m = _batch()
    cos = torch.stack(
        [torch.dot(s[i, j], t[i, j]) / (s[i, j].norm() * t[i, j].norm()) for i in range(3) for j in range(6) if m[i, j]]
    )
    assert torch.allclose(hidden_cosine(s, t, m), (1 - cos).sum())
    unit = torch.stack(
        [
            ((s[i, j] / s[i, j].norm() - t[i, j] / t[i, j].norm()) ** 2).sum()
            for i in range(3)
            for j in range(6)
            if m[i, j]
        ]
    )
    assert torch.allclose(hidden_normalized_mse(s, t, m), unit.sum())
    assert torch.allclose(unit, 2 - 2 * cos, atol=1e-6)


def test_teacher_gets_no_gradient():
    s, t, m = _batch()
    t.requires_grad_(True)
    hidden_mse(s, t, m).backward()
    assert t.grad is None and s.grad is not None
    assert torch.all(s.grad[m == 0] == 0)  # prompt and padding positions contribute nothing


def test_position_selection():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert select_positions(mask, "all").long().tolist() == mask.tolist()
    assert select_positions(mask, "first_k", 2).long().tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert select_positions(mask, "last_k", 1).long().tolist() == [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="k >= 1"):
        select_positions(mask, "last_k", 0)


def test_masked_mean_global_denominator_and_empty_mask():
    values = torch.ones(2, 3)
    assert masked_mean(values, torch.zeros(2, 3)) == 0  # no tokens: 0, not NaN
    assert masked_mean(values, torch.ones(2, 3), num_tokens=12) == 0.5


def test_micro_batches_with_step_denominator_equal_the_full_batch():
    # The loss of a step is the sum over all micro-batches divided by the step's token count (every token weighs
    # the same), so splitting a batch with unequal response lengths must not change the gradient.
    s, t, m = _batch(b=4, seed=1)
    m = torch.cat([m, torch.ones(1, 6, dtype=torch.long)])[:4]
    full = hidden_mse(s, t, m) / m.sum()
    (grad_full,) = torch.autograd.grad(full, s)
    total = m.sum()
    parts = [hidden_mse(s[i : i + 2], t[i : i + 2], m[i : i + 2]) / total for i in (0, 2)]
    (grad_parts,) = torch.autograd.grad(sum(parts), s)
    assert torch.allclose(grad_full, grad_parts)
    per_micro = [hidden_mse(s[i : i + 2], t[i : i + 2], m[i : i + 2]) / m[i : i + 2].sum() / 2 for i in (0, 2)]
    (grad_naive,) = torch.autograd.grad(sum(per_micro), s)
    assert not torch.allclose(grad_full, grad_naive)  # the per-micro-batch mean is a different objective


def test_hidden_loss_sums_per_pair_and_config_errors():
    s, t, m = _batch()
    sums = hidden_loss_sums({"0_1": s, "1_3": s * 2}, {"0_1": t, "1_3": t}, m, HiddenLossConfig(kind="cosine"))
    assert set(sums) == {"0_1", "1_3"} and torch.allclose(sums["0_1"], hidden_cosine(s, t, m))
    last = hidden_loss_sums({"a": s}, {"a": t}, m, HiddenLossConfig(positions="last_k", k=1))["a"]
    assert torch.allclose(last, hidden_mse(s, t, select_positions(m, "last_k", 1)))
    with pytest.raises(ValueError, match="valid names: mse, cosine, normalized_mse"):
        HiddenLossConfig(kind="l1")
