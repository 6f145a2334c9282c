"""Width pruning: importance ranking keeps what a hand-built case says it must; full width changes nothing; the
result is a plain Hugging Face model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from oprd.data import PromptDataModule
from oprd.models import ModelSpec, load_config, load_model, tiny_tokenizer
from oprd.models.width import WidthPrune, importance, kept_heads, prune_width, width_pruned_config
from tests.helpers import TEACHER, make_module, tiny_llama, tiny_qwen3, trainer


def _batch(vocab=384, b=3, t=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=generator)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding must not count
    return ids, mask


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3])
def test_pruning_to_the_full_width_reproduces_the_logits_exactly(build):
    model = build(layers=2, width=32)
    ids, mask = _batch()
    full = WidthPrune()
    pruned = prune_width(model, width_pruned_config(model.config, full), importance(model, ids, mask))
    with torch.no_grad():
        assert torch.equal(pruned(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_importance_keeps_the_channels_heads_and_neurons_that_carry_the_activation():
    model = tiny_llama(layers=2, width=32)  # 4 query heads in 2 key/value groups, 64 neurons
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 7]] *= 1000  # two dominant residual channels
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[:8] = 0  # value head 0 is silent: query heads 0 and 1 output nothing
            layer.mlp.up_proj.weight[[5, 9, 40]] *= 100  # three loud neurons
    ids, mask = _batch()
    scores = importance(model, ids, mask)
    assert set(torch.topk(scores.channels, 2).indices.tolist()) == {3, 7}
    assert scores.heads[0][:2].tolist() == [0.0, 0.0] and (scores.heads[0][2:] > 0).all()
    prune = WidthPrune(hidden_size=2, num_attention_heads=2, intermediate_size=3)
    pruned = prune_width(model, width_pruned_config(model.config, prune), scores)
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, [3, 7]])
    for old, new in zip(model.model.layers, pruned.model.layers, strict=True):
        assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[[5, 9, 40]][:, [3, 7]])


def test_heads_are_kept_whole_and_evenly_per_key_value_group():
    # 6 query heads in 3 groups of 2; keeping 3 keeps each group's louder head, even when one group is all loud.
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 3.0, 4.0])
    assert kept_heads(scores, 3, 3).tolist() == [1, 2, 5]
    assert kept_heads(scores, 6, 3).tolist() == [0, 1, 2, 3, 4, 5]


def test_a_width_pruned_model_saves_loads_and_generates(tmp_path):
    model = tiny_qwen3(layers=2, width=32)
    ids, mask = _batch()
    prune = WidthPrune(hidden_size=16, num_attention_heads=2, intermediate_size=24)
    pruned = prune_width(model, width_pruned_config(model.config, prune), importance(model, ids, mask))
    sizes = (pruned.config.hidden_size, pruned.config.num_attention_heads, pruned.config.intermediate_size)
    assert sizes == (16, 2, 24)
    assert pruned.config.head_dim == 8 and pruned.model.layers[0].self_attn.q_proj.weight.shape == (16, 16)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, pruned(ids, attention_mask=mask).logits)
        out = loaded.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 14)


def test_bad_widths_are_refused_with_the_valid_choice():
    config = tiny_llama(layers=1).config
    with pytest.raises(ValueError, match="must be a multiple of the 2 key/value heads"):
        width_pruned_config(config, WidthPrune(num_attention_heads=3))
    with pytest.raises(ValueError, match="width.hidden_size = 64 is more than the model's 32"):
        width_pruned_config(config, WidthPrune(hidden_size=64))
    with pytest.raises(ValueError, match="width.intermediate_size must be >= 1"):
        WidthPrune(intermediate_size=0)
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="Width pruning supports llama"):
        width_pruned_config(config, WidthPrune(hidden_size=16))


def test_a_width_pruned_student_distils_through_linear_projectors(tmp_path):
    narrow = WidthPrune(hidden_size=48, num_attention_heads=2, intermediate_size=96)
    student = ModelSpec(config=TEACHER, seed=1, width=narrow, keep_every=2)  # the teacher, narrower and shallower
    module = make_module(student=student, objective={"layer_map": "pruned"})
    assert module.student.config.hidden_size == 48 and module.student.config.num_hidden_layers == 2
    assert load_config(student, 384).hidden_size == 48  # known before any weight loads
    assert module.objective.projectors.proj["0_1"].weight.shape == (64, 48)
    trainer(tmp_path, max_steps=2).fit(module, PromptDataModule(batch_size=2))
    rebuilt = load_model(student, load_config(student, 384), module.pair.tokenizer)  # the same choice every time
    fresh = make_module(student=student, objective={"layer_map": "pruned"}).student
    assert torch.equal(rebuilt.model.embed_tokens.weight, fresh.model.embed_tokens.weight)


def test_width_pruning_calibrates_on_the_runs_own_training_prompts(tmp_path, monkeypatch):
    # With data.seed 1 the built-in task holds out other prompts than with the default seed: calibration must follow.
    import oprd.models.spec
    from oprd.cli.fit import build_cli
    from tests.helpers import ROOT

    seen: list[str] = []

    def recording(model, input_ids, attention_mask):
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        seen.extend(text.split("\n")[1] for text in texts)  # "user\n<prompt>\nassistant\n" (the chat template)
        return importance(model, input_ids, attention_mask)

    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(oprd.models.spec, "importance", recording)
    width = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    cli = build_cli([
        "--config", str(ROOT / "configs/tiny.yaml"), "--data.seed", "1", "--data.num_val", "150",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        *(arg for key, value in width.items() for arg in (f"--model.student.width.{key}", str(value))),
    ])  # fmt: skip
    assert cli.model.student.config.hidden_size == 16
    data = PromptDataModule(seed=1, num_val=150)
    data.setup("fit")
    assert seen == [item["prompt"] for item in data.train_items[:32]]
    assert not set(seen) & {item["prompt"] for item in data.val_items}
