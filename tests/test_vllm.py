"""The vLLM rollout engine on CPU (`make test-vllm`; skipped where vLLM is not installed).

vLLM's CPU attention needs a head size of at least 32, so these tests use their own small Llama (4 heads of 32), with
a wider initialisation than the default so that greedy decoding does not repeat one token.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from oprd.data import PromptDataModule
from oprd.models import ModelSpec
from oprd.models.lora import LoraSettings
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig
from tests.conftest import TEACHER, make_module, trainer

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

STUDENT = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.15,
}
PROMPTS = [f"What is {a} plus {a + 5}? Think about it." for a in range(1, 7)]


def module(engine: str, **rollout):
    config = RolloutConfig(max_new_tokens=12, engine=engine, vllm_kv_cache_gb=0.25, **rollout)
    # A constant rate: a run cut at step 2 then resumed follows the same schedule as one run to step 4.
    optim = OptimConfig(lr=1e-3, schedule="constant")
    return make_module(student=ModelSpec(config=STUDENT, seed=3), rollout=config, max_prompt_length=224, optim=optim)


@pytest.fixture(scope="module")
def pair():
    return module("vllm"), module("hf")


def greedy(m, prompts=PROMPTS):
    return m.sample(prompts, RolloutConfig(max_new_tokens=12, do_sample=False, engine=m.rollout_cfg.engine))


def responses(roll) -> list[list[int]]:
    return [r.tolist() for r in roll.responses()]


def test_greedy_vllm_rollouts_equal_greedy_hf_rollouts(pair):
    with_vllm, with_hf = pair
    a, b = greedy(with_vllm), greedy(with_hf)
    assert responses(a) == responses(b)
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.attention_mask, b.attention_mask)
    hf_logprobs = torch.log_softmax(with_hf.student(b.input_ids, attention_mask=b.attention_mask).logits.float(), -1)
    own = hf_logprobs[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0][b.response_mask[:, 1:].bool()]
    assert (a.logprobs[:, 1:][a.response_mask[:, 1:].bool()] - own).abs().max() < 1e-3


def test_seeded_sampling_repeats_and_differs_between_seeds(pair):
    with_vllm, _ = pair
    config = RolloutConfig(max_new_tokens=12, temperature=1.0, engine="vllm")
    first, again = (with_vllm.sample(PROMPTS, config, seed=11) for _ in range(2))
    other = with_vllm.sample(PROMPTS, config, seed=12)
    assert responses(first) == responses(again) and responses(first) != responses(other)


def _perturb(student) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param) * param.std() * 0.5)


def test_after_a_sync_the_engine_samples_the_updated_student_and_not_without(tmp_path):
    with_vllm, hf = module("vllm"), module("hf")
    # Prompts of about 170 tokens: more than one block (128) of the prefix cache.
    long = [" ".join(["What is 1 plus 2?"] * 24) + f" {i}" for i in range(2)]
    before = greedy(with_vllm, long)
    _perturb(with_vllm.student)
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf, long)  # the updated student's own greedy answers
    assert responses(before) != responses(expected)
    engine = with_vllm.pair.engine
    state = with_vllm.student.state_dict()
    # Without the prefix-cache reset, the prompt blocks cached by `before` keep the old weights' states.
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(state.items()))})
    assert responses(greedy(with_vllm, long)) != responses(expected)
    # Without the LM head (tied to the embeddings) the CPU engine keeps its packed copy of the old head.
    engine.reload(hf.student)  # back to a clean state first: this run's weights, cache reset
    _perturb(with_vllm.student)
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf, long)
    state = with_vllm.student.state_dict()
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(
        [(k, v) for k, v in state.items() if k != "lm_head.weight"])})  # fmt: skip
    engine.llm.reset_prefix_cache()
    assert responses(greedy(with_vllm, long)) != responses(expected)
    engine.sync_weights(with_vllm.student, step=1)
    assert responses(greedy(with_vllm, long)) == responses(expected) and engine.sync_s > 0


def _fit(root: Path, steps: int, ckpt_path: str | None = None) -> dict[int, str]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    m = module("vllm")
    fit = trainer(root, max_steps=steps, logger=CSVLogger(root, version=str(steps)), log_every_n_steps=1,
                  enable_checkpointing=True, callbacks=[ModelCheckpoint(root / "ckpt", save_last=True,
                                                                         every_n_train_steps=1)])  # fmt: skip
    fit.fit(m, PromptDataModule(batch_size=2), ckpt_path=ckpt_path)
    (metrics,) = (root / "lightning_logs" / str(steps)).glob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert all(float(r["train/rollout_logprob_gap"]) < 1e-3 for r in rows if r.get("train/rollout_logprob_gap"))
    assert any(r.get("train/weight_sync_s") for r in rows)
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def test_a_fit_with_vllm_rollouts_resumes_with_the_same_losses(tmp_path):
    reference = _fit(tmp_path / "reference", 4)
    _fit(tmp_path / "run", 2)
    resumed = _fit(tmp_path / "run", 4, ckpt_path=str(tmp_path / "run/ckpt/last.ckpt"))
    assert sorted(reference) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    assert resumed == {s: reference[s] for s in resumed}


def test_the_teacher_is_sampled_with_its_own_generate(pair):
    with_vllm, _ = pair
    roll = with_vllm.sample(PROMPTS[:2], RolloutConfig(max_new_tokens=4, do_sample=False), model=with_vllm.pair.teacher)
    assert roll.logprobs is None  # not the engine's: it holds the student only
    assert TEACHER["hidden_size"] == with_vllm.pair.teacher.config.hidden_size


def test_a_lora_student_is_served_with_its_adapters_folded_in():
    def lora_module(engine: str):
        config = RolloutConfig(max_new_tokens=12, engine=engine, vllm_kv_cache_gb=0.25)
        student = ModelSpec(config=STUDENT, seed=3, lora=LoraSettings(r=4, alpha=8))
        return make_module(student=student, rollout=config, max_prompt_length=224)

    with_vllm, hf = lora_module("vllm"), lora_module("hf")
    before = greedy(with_vllm)  # the engine starts from the adapters' zero update: the base model
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in with_vllm.student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf)  # the adapted student's own greedy answers, through its PeftModel
    assert responses(before) != responses(expected)
    with_vllm.pair.engine.sync_weights(with_vllm.student, step=1)
    assert responses(greedy(with_vllm)) == responses(expected)
