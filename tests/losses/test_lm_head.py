"""The chunked LM-head path agrees with the dense reference (values and gradients) and never builds [b, t, v]."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import oprd.losses.lm_head as lm_head
from oprd.losses.lm_head import chunked_token_loss_sum, dense_token_loss_sum, token_loss_sum_from_hidden
from oprd.losses.token import ESTIMATORS, OBJECTIVES, TokenLossConfig, token_loss_sum
from tests.helpers import EXACT_RTOL, relative_error

B, T, D_S, D_T = 3, 6, 8, 10
VOCAB, V_STUDENT, V_TEACHER = 17, 20, 23  # both heads padded past the shared tokenizer vocabulary
N_KEPT = 12


pytestmark = pytest.mark.usefixtures("one_thread")


VALID = [(o, e) for o, e in itertools.product(OBJECTIVES, ESTIMATORS) if e != "sampled" or o == "reverse_kl"]


def make_inputs(seed: int = 0, all_masked: bool = False):
    """Float64 states and heads: chunked and dense are the same sums in another order, compared far below float32
    round-off (tests/helpers.py)."""
    torch.manual_seed(seed)
    student_hidden = torch.randn(B, T, D_S, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, D_T, dtype=torch.float64)
    student_head = nn.Linear(D_S, V_STUDENT, bias=True, dtype=torch.float64)
    teacher_head = nn.Linear(D_T, V_TEACHER, bias=True, dtype=torch.float64).requires_grad_(False)
    mask = torch.zeros(B * T, dtype=torch.bool)
    if not all_masked:
        mask[torch.randperm(B * T)[:N_KEPT]] = True
    mask = mask.view(B, T)
    targets = torch.randint(0, VOCAB, (B, T)).masked_fill(~mask, -100)
    return student_hidden, student_head, teacher_hidden, teacher_head, targets, mask


def loss_and_grads(fn, inputs, config):
    student_hidden, student_head, *_ = inputs
    student_hidden.grad = None
    student_head.zero_grad(set_to_none=True)
    loss = fn(*inputs, config, VOCAB)
    loss.backward()
    return loss.detach(), student_hidden.grad, student_head.weight.grad, student_head.bias.grad


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g is not None and w is not None and g.dtype == w.dtype == torch.float64
        assert relative_error(g, w) < EXACT_RTOL


@pytest.mark.parametrize("chunk_size", [5, 4, 64])  # 12 kept tokens: remainder chunk, exact division, one chunk
@pytest.mark.parametrize("objective,estimator", VALID)
def test_chunked_equals_dense(objective, estimator, chunk_size):
    inputs = make_inputs()
    config = TokenLossConfig(
        objective=objective,
        estimator=estimator,
        beta=0.3,
        temperature=1.4,
        top_k=5,
        tail=estimator == "topk",
        chunk_size=chunk_size,
        logit_softcap=4.0,
        logit_scale=1.5,
    )
    dense = loss_and_grads(dense_token_loss_sum, inputs, config)
    chunked = loss_and_grads(chunked_token_loss_sum, inputs, config)
    assert_same(chunked, dense)
    assert dense[0] != 0 and dense[2].abs().max() > 0  # partial top-k sums can be negative


@pytest.mark.parametrize("objective,estimator", VALID)
def test_all_masked_gives_zero_loss_and_zero_grads(objective, estimator):
    inputs = make_inputs(all_masked=True)
    config = TokenLossConfig(objective=objective, estimator=estimator, chunk_size=4, top_k=3)
    for fn in (dense_token_loss_sum, chunked_token_loss_sum):
        loss, *grads = loss_and_grads(fn, inputs, config)
        assert loss.item() == 0.0
        for grad in grads:
            assert grad is not None and torch.isfinite(grad).all() and (grad == 0).all()


def test_softcap_and_padded_vocab_match_logits_built_by_hand():
    student_hidden, student_head, teacher_hidden, teacher_head, targets, mask = inputs = make_inputs(1)
    config = TokenLossConfig(objective="jsd", beta=0.5, logit_softcap=2.0, chunk_size=5)

    def by_hand(hidden, head, cap):
        logits = hidden @ head.weight[:VOCAB].T + head.bias[:VOCAB]
        return logits if cap is None else cap * torch.tanh(logits / cap)

    for cap in (2.0, None):
        want = token_loss_sum(
            by_hand(student_hidden, student_head, cap), by_hand(teacher_hidden, teacher_head, cap), None, mask, config
        )
        got = chunked_token_loss_sum(*inputs, TokenLossConfig(objective="jsd", logit_softcap=cap, chunk_size=5), VOCAB)
        torch.testing.assert_close(got, want)
    # The cap is strong enough here to change the loss, so the check above could not pass by ignoring it.
    capped, uncapped = (
        chunked_token_loss_sum(*inputs, TokenLossConfig(logit_softcap=cap, chunk_size=5), VOCAB) for cap in (2.0, None)
    )
    assert not torch.allclose(capped, uncapped)


def test_bare_weight_heads_and_bias_free_heads():
    student_hidden, student_head, teacher_hidden, teacher_head, targets, mask = make_inputs(2)
    config = TokenLossConfig(chunk_size=5)
    with torch.no_grad():
        student_head.bias.zero_()
        teacher_head.bias.zero_()
    with_modules = chunked_token_loss_sum(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, config, VOCAB
    )
    with_weights = chunked_token_loss_sum(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, targets, mask, config, VOCAB
    )
    dense = dense_token_loss_sum(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, targets, mask, config, VOCAB
    )
    torch.testing.assert_close(with_weights, with_modules)
    torch.testing.assert_close(with_weights, dense)
    assert with_weights > 0


def test_dispatcher_picks_dense_only_for_chunk_size_zero(monkeypatch):
    inputs = make_inputs(3)
    calls = []
    for name in ("dense_token_loss_sum", "chunked_token_loss_sum"):
        original = getattr(lm_head, name)
        monkeypatch.setattr(lm_head, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    dense = token_loss_sum_from_hidden(*inputs, TokenLossConfig(chunk_size=0), VOCAB)
    chunked = token_loss_sum_from_hidden(*inputs, TokenLossConfig(chunk_size=4), VOCAB)
    assert calls == ["dense_token_loss_sum", "chunked_token_loss_sum"]
    torch.testing.assert_close(chunked, dense)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_loss_sum(*inputs, TokenLossConfig(chunk_size=0), VOCAB)


class VocabRows(TorchDispatchMode):
    """Largest number of rows of any vocabulary-wide tensor an op produces, forward and backward.

    Head-weight-shaped tensors (`weight.t()` inside `linear`, its gradient) are `[d, v]` and not counted.
    """

    def __init__(self):
        super().__init__()
        self.max_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] not in (VOCAB, V_STUDENT, V_TEACHER):
                continue
            if x.dim() == 2 and x.shape[0] in (D_S, D_T):
                continue
            self.max_rows = max(self.max_rows, x.numel() // x.shape[-1])
        return out


@pytest.mark.parametrize("estimator", ["exact", "topk", "sampled"])
def test_chunked_never_builds_full_logits(estimator):
    inputs = make_inputs(4)
    config = TokenLossConfig(estimator=estimator, chunk_size=4, top_k=3)
    rows = {}
    for name, fn in (("dense", dense_token_loss_sum), ("chunked", chunked_token_loss_sum)):
        with VocabRows() as mode:
            fn(*inputs, config, VOCAB).backward()
        rows[name] = mode.max_rows
    assert rows["dense"] == B * T
    assert rows["chunked"] == config.chunk_size
