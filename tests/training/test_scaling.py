"""Single-process scaling parts: unreached parameters are frozen, the rollout-engine interface, throughput logs."""

from __future__ import annotations

import pytest
import torch

import oprd.rollout
from oprd.data import PromptDataModule
from oprd.losses.token import TokenLossConfig
from oprd.models.capture import NORM
from oprd.parallel.sharding import freeze_unreached
from oprd.rollout import HFGenerateEngine, RolloutConfig, get_engine, register_engine
from tests.helpers import make_module, tiny_llama, trainer


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_parameters_the_loss_cannot_reach_are_frozen():
    model = tiny_llama(layers=3)
    frozen = freeze_unreached(model, [0, 1])
    assert set(frozen) == {
        n for n in _trainable(tiny_llama(layers=3)) if n.startswith(("model.layers.2.", "model.norm.", "lm_head."))
    }
    assert "model.norm.weight" in frozen and "model.embed_tokens.weight" not in frozen
    assert freeze_unreached(tiny_llama(layers=3), [-1, NORM], needs_head=True) == []
    assert freeze_unreached(tiny_llama(layers=3), [NORM]) == ["lm_head.weight"]


def test_a_head_tied_to_the_embeddings_stays_trainable():
    model = tiny_llama(layers=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    assert freeze_unreached(model, [1]) == ["model.norm.weight"]
    assert model.lm_head.weight.requires_grad


def test_every_trainable_parameter_gets_a_gradient():
    """What DDP (find_unused_parameters=False) needs, for the hidden-only, truncated and token-space objectives."""
    exact = TokenLossConfig(objective="reverse_kl", estimator="exact")
    cases = [{}, {"objective": {"layer_map": [[0, 1]]}}, {"objective": {"token_loss": exact}}]
    for kwargs in cases:
        module = make_module(**kwargs)
        roll = module.distiller.sample(["What is 1 plus 2?"], module.distiller.rollout, seed=0)
        module.distiller.distill(roll).loss.backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (kwargs, missing)
    assert "lm_head.weight" not in module.distiller.frozen  # the token-space term trains the head


class RecordingEngine(HFGenerateEngine):
    instances: list[RecordingEngine] = []

    def __init__(self) -> None:
        self.calls, self.synced = 0, []
        RecordingEngine.instances.append(self)

    def generate(self, *args, **kwargs):
        self.calls += 1
        return super().generate(*args, **kwargs)

    def sync_weights(self, model, step: int) -> None:
        self.synced.append(step)


def test_rollout_engine_is_pluggable_and_synced_after_each_step_and_throughput_is_logged(tmp_path, monkeypatch):
    monkeypatch.setitem(oprd.rollout.ENGINES, "recording", RecordingEngine)
    module = make_module(rollout=RolloutConfig(max_new_tokens=8, engine="recording"))
    (engine,) = RecordingEngine.instances[-1:]
    assert module.pair.engine is engine
    t = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2)
    t.fit(module, PromptDataModule(batch_size=2))
    assert engine.calls == 4 and engine.synced == [1, 2]  # 2 micro-batches per step; one sync per optimizer step
    logged = t.logged_metrics
    for key in ("train/rollout_tokens_per_s", "train/update_tokens_per_s", "train/tokens_per_s", "train/peak_rss_gb"):
        assert float(logged[key]) > 0, key
    assert float(logged["train/update_s"]) > 0 and float(logged["train/rollout_s"]) > 0


def test_unknown_engines_are_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="registered: hf, vllm"):
        get_engine("sglang")
    with pytest.raises(TypeError):
        register_engine("bad", object)
    assert isinstance(get_engine("hf"), HFGenerateEngine)
    assert make_module().distiller.rollout.greedy().engine == "hf"


def test_sharding_is_a_no_op_in_one_process(tmp_path):
    module = make_module(teacher_placement={"shard": True})
    with pytest.warns(UserWarning, match="teacher_placement.shard"):
        trainer(tmp_path, max_steps=1).fit(module, PromptDataModule(batch_size=2))
    assert not any(hasattr(p, "full_tensor") for p in module.parameters())
    assert torch.isfinite(next(module.pair.teacher.parameters())).all()
