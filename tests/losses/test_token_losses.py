"""Token-space objectives against closed forms written out here with plain torch ops."""

from __future__ import annotations

import pytest
import torch

from oprd.losses.token import (
    ESTIMATORS,
    OBJECTIVES,
    TokenLossConfig,
    apply_logit_transforms,
    slice_vocab,
    token_loss_per_token,
    token_loss_sum,
)

B, T, V = 2, 3, 11


pytestmark = pytest.mark.usefixtures("one_thread")


def logits_pair(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return 2 * torch.randn(B, T, V, dtype=dtype), 2 * torch.randn(B, T, V, dtype=dtype)


def probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    e = torch.exp(logits / temperature - (logits / temperature).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def ref_jsd(ps: torch.Tensor, pt: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * pt + (1 - beta) * ps
    return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)


def ref_objective(ps: torch.Tensor, pt: torch.Tensor, objective: str, beta: float) -> torch.Tensor:
    if objective == "forward_kl":
        return ref_kl(pt, ps)
    if objective == "reverse_kl":
        return ref_kl(ps, pt)
    if objective == "jsd":
        return ref_jsd(ps, pt, beta)
    return 0.5 * (ps - pt).abs().sum(-1)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize(
    "objective,beta",
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)],
)
def test_exact_matches_closed_form(objective, beta, temperature):
    s, t = logits_pair()
    config = TokenLossConfig(objective=objective, beta=beta, temperature=temperature)
    got = token_loss_per_token(s, t, None, config)
    want = ref_objective(probs(s, temperature), probs(t, temperature), objective, beta)
    assert got.shape == (B, T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got > 0).all()


def test_jsd_endpoints_are_the_kls_and_the_mixture_points_the_same_way():
    s, t = logits_pair(1)
    ps, pt = probs(s), probs(t)
    jsd = lambda beta: token_loss_per_token(s, t, None, TokenLossConfig(objective="jsd", beta=beta))  # noqa: E731
    torch.testing.assert_close(jsd(0.0), ref_kl(pt, ps))
    torch.testing.assert_close(jsd(1.0), ref_kl(ps, pt))
    # Away from the endpoints JSD(beta) ~ beta * forward KL near 0 and (1 - beta) * reverse KL near 1: the mixture
    # is oriented the way the special cases are.
    eps = 1e-6
    torch.testing.assert_close(jsd(eps) / eps, ref_kl(pt, ps), rtol=1e-4, atol=0)
    torch.testing.assert_close(jsd(1 - eps) / eps, ref_kl(ps, pt), rtol=1e-4, atol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("estimator", ["topk", "topk_sg"])
@pytest.mark.parametrize("tail", [False, True])
def test_topk_with_full_vocab_equals_exact(objective, estimator, tail):
    s, t = logits_pair(2)
    s.requires_grad_(True)
    exact = token_loss_per_token(s, t, None, TokenLossConfig(objective=objective, temperature=1.5))
    (grad_exact,) = torch.autograd.grad(exact.sum(), s)
    config = TokenLossConfig(objective=objective, estimator=estimator, top_k=V + 5, tail=tail, temperature=1.5)
    topk = token_loss_per_token(s, t, None, config)
    (grad_topk,) = torch.autograd.grad(topk.sum(), s)
    torch.testing.assert_close(topk, exact)
    torch.testing.assert_close(grad_topk, grad_exact)


def ref_topk(s, t, k, tail, objective, beta, temperature):
    """Top-k terms by hand: select the student's k most likely tokens, append 1 - sum as the tail."""
    ps, pt = probs(s, temperature), probs(t, temperature)
    index = torch.argsort(ps, dim=-1, descending=True)[..., :k]
    ps_k, pt_k = ps.gather(-1, index), pt.gather(-1, index)
    if tail:
        ps_k = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
        pt_k = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
    return ref_objective(ps_k, pt_k, objective, beta)


@pytest.mark.parametrize("objective,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
@pytest.mark.parametrize("tail", [False, True])
def test_topk_matches_hand_written_terms(objective, beta, tail):
    s, t = logits_pair(3)
    config = TokenLossConfig(objective=objective, estimator="topk", top_k=4, tail=tail, beta=beta, temperature=0.8)
    got = token_loss_per_token(s, t, None, config)
    torch.testing.assert_close(got, ref_topk(s, t, 4, tail, objective, beta, 0.8))
    exact = token_loss_per_token(s, t, None, TokenLossConfig(objective=objective, beta=beta, temperature=0.8))
    assert not torch.allclose(got, exact)


def test_topk_sg_reverse_kl_value_equal_gradient_is_score_function():
    s, t = logits_pair(4)
    s.requires_grad_(True)
    k, temperature = 4, 1.3
    topk = token_loss_per_token(s, t, None, TokenLossConfig(estimator="topk", top_k=k, temperature=temperature))
    sg = token_loss_per_token(s, t, None, TokenLossConfig(estimator="topk_sg", top_k=k, temperature=temperature))
    (grad_topk,) = torch.autograd.grad(topk.sum(), s)
    (grad_sg,) = torch.autograd.grad(sg.sum(), s)
    torch.testing.assert_close(sg, topk)
    assert not torch.allclose(grad_sg, grad_topk, atol=1e-6)
    # d/dz_j sum_{i in K} p_i a_i with a_i fixed and dp_i/dz_j = p_i (delta_ij - p_j) / T.
    p, pt = probs(s.detach(), temperature), probs(t, temperature)
    in_k = torch.zeros_like(p).scatter(-1, torch.argsort(p, -1, descending=True)[..., :k], 1.0)
    a = (p.log() - pt.log()) * in_k
    want = (p * a - p * (p * a).sum(-1, keepdim=True)) / temperature
    torch.testing.assert_close(grad_sg, want)
    # The plain top-k gradient carries the extra sum_{i in K} grad p_i (the "+1" of d(p log p)).
    extra = (p * in_k - p * (p * in_k).sum(-1, keepdim=True)) / temperature
    torch.testing.assert_close(grad_topk, want + extra)


@pytest.mark.parametrize(
    "objective,tail", [("reverse_kl", True), ("forward_kl", False), ("jsd", False), ("tvd", False)]
)
def test_topk_sg_equals_topk_where_no_constant_is_dropped(objective, tail):
    """With the tail the kept outcomes form a full distribution, so sum grad p_S = 0; other objectives have no +1."""
    s, t = logits_pair(5)
    s.requires_grad_(True)
    grads = []
    for estimator in ("topk", "topk_sg"):
        config = TokenLossConfig(objective=objective, estimator=estimator, top_k=3, tail=tail)
        grads.append(torch.autograd.grad(token_loss_per_token(s, t, None, config).sum(), s)[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().max() > 1e-3


def test_sampled_value_and_policy_gradient():
    s, t = logits_pair(6)
    s.requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    temperature = 1.7
    got = token_loss_per_token(s, t, targets, TokenLossConfig(estimator="sampled", temperature=temperature))
    p, pt = probs(s.detach(), temperature), probs(t, temperature)
    onehot = torch.nn.functional.one_hot(targets, V).to(p.dtype)
    advantage = (p.log() - pt.log()).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got, advantage)  # the logged value is the single-sample reverse-KL estimate
    (grad,) = torch.autograd.grad(got.sum(), s)
    # sg(a) * grad log p_S(y), with d log p_y / dz = (onehot(y) - p) / T.
    torch.testing.assert_close(grad, advantage[..., None] * (onehot - p) / temperature)


def test_sampled_needs_targets_and_reverse_kl():
    s, t = logits_pair()
    with pytest.raises(ValueError, match="targets"):
        token_loss_per_token(s, t, None, TokenLossConfig(estimator="sampled"))
    with pytest.raises(ValueError, match="reverse_kl"):
        TokenLossConfig(objective="forward_kl", estimator="sampled")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_token_loss_sum_masks_and_ignores_padding_targets(estimator):
    s, t = logits_pair(7)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    targets = torch.randint(0, V, (B, T)).masked_fill(mask == 0, -100)  # HF's ignore index on dropped positions
    config = TokenLossConfig(estimator=estimator, top_k=4)
    per_token = token_loss_per_token(s, t, targets.clamp_min(0), config)
    got = token_loss_sum(s, t, targets, mask, config)
    torch.testing.assert_close(got, per_token[mask.bool()].sum())


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("estimator,tail", [("exact", False), ("topk", True), ("topk_sg", False)])
def test_minus_inf_logits_give_no_nan(objective, estimator, tail):
    """Tokens both models rule out (-inf) contribute nothing: same value and gradient as dropping the columns."""
    s, t = logits_pair(8)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[2, 7]] = True
    config = TokenLossConfig(objective=objective, estimator=estimator, top_k=V, tail=tail, beta=0.4)
    s_inf = s.masked_fill(banned, float("-inf")).requires_grad_(True)
    s_kept = s[..., ~banned].clone().requires_grad_(True)
    got = token_loss_per_token(s_inf, t.masked_fill(banned, float("-inf")), None, config)
    want = token_loss_per_token(s_kept, t[..., ~banned], None, config)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want)
    assert torch.isfinite(s_inf.grad).all()
    torch.testing.assert_close(s_inf.grad[..., ~banned], s_kept.grad)
    assert (s_inf.grad[..., banned] == 0).all()


def test_low_precision_inputs_are_computed_in_float32():
    s, t = logits_pair(9, dtype=torch.float32)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = token_loss_per_token(s16, t16, None, TokenLossConfig())
    assert got.dtype == torch.float32
    want = ref_kl(probs(s16.double()), probs(t16.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_logit_transforms():
    x = torch.linspace(-50, 50, 11)
    assert apply_logit_transforms(x, TokenLossConfig()) is x
    torch.testing.assert_close(apply_logit_transforms(x, TokenLossConfig(logit_scale=0.5)), x * 0.5)
    capped = apply_logit_transforms(x, TokenLossConfig(logit_softcap=30.0))
    torch.testing.assert_close(capped, 30.0 * torch.tanh(x / 30.0))
    assert capped.abs().max() < 30.0
    both = apply_logit_transforms(x, TokenLossConfig(logit_scale=2.0, logit_softcap=30.0))
    torch.testing.assert_close(both, 30.0 * torch.tanh(2.0 * x / 30.0))


def test_slice_vocab():
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(slice_vocab(x, 11), x[..., :11])
    assert slice_vocab(x, 16).shape == x.shape
    with pytest.raises(ValueError, match="vocab_size=17"):
        slice_vocab(x, 17)
    with pytest.raises(ValueError, match="slice_vocab"):
        token_loss_per_token(x, torch.randn(2, 3, 15), None, TokenLossConfig())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"objective": "kl"}, "forward_kl, reverse_kl, jsd, tvd"),
        ({"estimator": "top_k"}, "exact, topk, topk_sg, sampled"),
        ({"objective": "jsd", "estimator": "sampled"}, "reverse_kl"),
        ({"beta": 1.5}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"logit_softcap": 0.0}, "logit_softcap"),
        ({"logit_scale": -1.0}, "logit_scale"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLossConfig(**kwargs)


def test_model_logit_transforms_fill_unset_fields_only():
    from types import SimpleNamespace

    from oprd.objective.objective import with_model_logit_transforms

    gemma = SimpleNamespace(final_logit_softcapping=30.0, logit_scale=None)
    mine = TokenLossConfig()
    filled = with_model_logit_transforms(mine, gemma)
    assert filled.logit_softcap == 30.0 and mine.logit_softcap is None
    assert with_model_logit_transforms(TokenLossConfig(logit_softcap=5.0), gemma).logit_softcap == 5.0
    assert with_model_logit_transforms(None, gemma) is None
    assert with_model_logit_transforms(mine, SimpleNamespace()) is mine
