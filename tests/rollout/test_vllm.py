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
from tests.helpers import TEACHER, make_module, trainer

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
    # Held-out scoring's settings: the module's, made greedy.
    return m.distiller.sample(prompts, m.distiller.rollout.greedy(12))


def greedy_in_step(m, prompts=PROMPTS):
    """Greedy answers as a training rollout samples them (between `wake` and `sleep`): from the engine's copy as it
    is, which may lag the student until the next scheduled sync."""
    m.pair.engine.wake()
    try:
        return greedy(m, prompts)
    finally:
        m.pair.engine.sleep()


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
    first, again = (with_vllm.distiller.sample(PROMPTS, config, seed=11) for _ in range(2))
    other = with_vllm.distiller.sample(PROMPTS, config, seed=12)
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
    assert responses(greedy_in_step(with_vllm, long)) != responses(expected)
    # Without the LM head (tied to the embeddings) the CPU engine keeps its packed copy of the old head.
    engine.reload(hf.student)  # back to a clean state first: this run's weights, cache reset
    _perturb(with_vllm.student)
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf, long)
    state = with_vllm.student.state_dict()
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(
        [(k, v) for k, v in state.items() if k != "lm_head.weight"])})  # fmt: skip
    engine.llm.reset_prefix_cache()
    assert responses(greedy_in_step(with_vllm, long)) != responses(expected)
    engine.sync_weights(with_vllm.student, step=1)
    assert responses(greedy_in_step(with_vllm, long)) == responses(expected) and engine.sync_s > 0


def _fit(root: Path, steps: int, ckpt_path: str | None = None, sync_every: int = 1, save_every: int = 1) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    m = module("vllm", sync_every=sync_every)
    fit = trainer(root, max_steps=steps, logger=CSVLogger(root, version=str(steps)), log_every_n_steps=1,
                  enable_checkpointing=True, callbacks=[ModelCheckpoint(root / "ckpt", save_last=True,
                                                                         every_n_train_steps=save_every)])  # fmt: skip
    fit.fit(m, PromptDataModule(batch_size=2), ckpt_path=ckpt_path)
    (metrics,) = (root / "lightning_logs" / str(steps)).glob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    gaps = {int(r["step"]): float(r["train/rollout_logprob_gap"]) for r in rows if r.get("train/rollout_logprob_gap")}
    if sync_every == 1:  # every rollout samples the student it trains
        assert all(gap < 1e-3 for gap in gaps.values())
    if steps >= sync_every:  # an optimizer step synced (a checkpoint's own sync, before it is saved, is not logged)
        assert any(r.get("train/weight_sync_s") for r in rows)
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}, gaps


def test_a_fit_with_vllm_rollouts_resumes_with_the_same_losses(tmp_path):
    reference, _ = _fit(tmp_path / "reference", 4)
    _fit(tmp_path / "run", 2)
    resumed, _ = _fit(tmp_path / "run", 4, ckpt_path=str(tmp_path / "run/ckpt/last.ckpt"))
    assert sorted(reference) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    assert resumed == {s: reference[s] for s in resumed}


def test_a_fit_that_syncs_every_3_steps_resumes_with_the_same_losses(tmp_path):
    # Checkpoints at step 2, between syncs (0 and 3): the resumed run's engine starts from the step-2 weights, so the
    # uninterrupted run must sample from them too from step 2 on.
    reference, gaps = _fit(tmp_path / "reference", 4, sync_every=3, save_every=2)
    assert gaps[0] < 1e-3 < gaps[1]  # step 1 samples the step-0 weights: the copy lags as sync_every allows
    _fit(tmp_path / "run", 2, sync_every=3, save_every=2)
    resumed, _ = _fit(tmp_path / "run", 4, ckpt_path=str(tmp_path / "run/ckpt/last.ckpt"), sync_every=3, save_every=2)
    assert sorted(reference) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    assert resumed == {s: reference[s] for s in resumed}


def _step(m, step: int) -> None:
    """An optimizer step as the engine sees it: the student's weights change in place, then `sync_weights`."""
    torch.manual_seed(step)
    with torch.no_grad():
        for param in m.student.parameters():
            param.add_(torch.randn_like(param) * param.std() * 0.5)
    m.pair.engine.sync_weights(m.student, step)


def test_held_out_answers_come_from_the_live_weights_between_syncs():
    with_vllm, hf = module("vllm", sync_every=4), module("hf")
    before = greedy_in_step(with_vllm)  # starts the engine on the step-0 weights
    _step(with_vllm, 1)  # not a sync step: training rollouts keep the step-0 copy
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf)
    assert responses(expected) != responses(before)
    assert responses(greedy_in_step(with_vllm)) == responses(before)
    # Scoring (what held-out accuracy and the report use) answers with the student whose KL it reports.
    assert responses(greedy(with_vllm)) == responses(expected)


def test_a_sleeping_engine_wakes_and_loads_pending_weights_for_a_generate_outside_a_step():
    with_vllm, hf = module("vllm", sync_every=1), module("hf")
    engine = with_vllm.pair.engine
    before = greedy_in_step(with_vllm)
    # Sleep mode needs a GPU; vLLM's CPU worker accepts `sleep` and `wake_up` as no-ops, so the engine's own
    # bookkeeping (asleep, pending weights) runs for real here, as it does on a GPU.
    engine.on_gpu = True
    engine.wake()
    greedy(with_vllm)
    engine.sleep()  # what training_step does after its rollout
    assert engine.asleep
    _step(with_vllm, 1)  # a sync step while asleep: the weights wait for the next wake
    assert engine.pending is not None
    hf.student.load_state_dict(with_vllm.student.state_dict())
    expected = greedy(hf)
    assert responses(expected) != responses(before)
    assert responses(greedy(with_vllm)) == responses(expected)  # e.g. held-out scoring after the last step
    assert engine.asleep and engine.pending is None  # back to sleep, the weights loaded


def test_a_weight_sync_prints_nothing_at_info(capfd):
    with_vllm, _ = module("vllm"), None
    greedy(with_vllm)
    capfd.readouterr()
    _step(with_vllm, 1)
    out, err = capfd.readouterr()
    assert with_vllm.pair.engine.sync_s is not None  # the sync ran
    assert " INFO " not in out + err and "Failed to load weights" not in out + err, out + err


def test_vllm_under_a_sharded_strategy_is_refused_before_any_model_loads(capsys, no_weight_loading):
    from tests.cli.test_preflight import fit_fails

    line = fit_fails(capsys, "--model.rollout.engine", "vllm", "--trainer.strategy", "fsdp2")
    assert "--trainer.strategy ddp" in line and "--model.rollout.engine hf" in line


def test_the_teacher_is_sampled_with_its_own_generate(pair):
    with_vllm, _ = pair
    roll = with_vllm.distiller.sample(
        PROMPTS[:2], RolloutConfig(max_new_tokens=4, do_sample=False), model=with_vllm.pair.teacher
    )
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
