"""Depth pruning: validation, independence from the teacher, equivalence with a hand-run of the kept layers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.masking_utils import create_causal_mask

from oprd.models.layers import find_layers as decoder_layers
from oprd.models.prune import check_keep_layers, every_kth, prune_layers, pruned_layer_map

SIZES = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, pad_token_id=0, eos_token_id=99)).eval()


def hand_run(teacher, keep: list[int], input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Outputs `[b, t, d]` of the teacher's layers `keep`, run one after the other (pre final norm)."""
    inner = teacher.model
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    # The cache argument is positional: transformers renamed it (`past_key_values` -> `cache`) in 5.2x.
    mask = create_causal_mask(teacher.config, hidden, torch.ones_like(input_ids), None, position_ids=position_ids)
    outputs = []
    for i in keep:
        hidden = inner.layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                 position_ids=position_ids)  # fmt: skip
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # tuple before transformers 4.54
        outputs.append(hidden)
    return outputs


def assert_cache_matches_full_pass(model, prompt: torch.Tensor, steps: int) -> None:
    """`generate` with a KV cache must produce the logits a cache-free pass over its own output gives."""
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        full = model(out.sequences, use_cache=False).logits  # [b, t, v]
    assert out.sequences.shape == (prompt.shape[0], prompt.shape[1] + steps)
    cached = torch.stack(out.logits, dim=1)  # [b, steps, v]
    # Compare logits, not tokens: a random tiny model's logits are nearly flat, so argmax ties flip on rounding. The
    # cached pass groups the same float32 sums differently (one new token against the cache): a dot product of n <= 64
    # terms rounds by at most ~n u (u = 6e-8) of its scale, ~4e-6, compounded over at most 4 layers ~2e-5 of the
    # logits' scale (~1). 1e-4 bounds that worst case; the errors seen are ~1e-7.
    torch.testing.assert_close(cached, full[:, prompt.shape[1] - 1 : -1], rtol=1e-4, atol=1e-4)


def test_every_kth():
    assert every_kth(30, 2) == list(range(0, 30, 2))
    assert len(every_kth(30, 2)) == 15
    assert every_kth(10, 3, offset=1) == [1, 4, 7]
    assert every_kth(4, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k must be"):
        every_kth(4, 0)
    with pytest.raises(ValueError, match="offset"):
        every_kth(4, 2, offset=4)


@pytest.mark.parametrize(
    ("keep", "message"),
    [([], "empty"), ([0, 4], "out of range"), ([-1, 2], "out of range"), ([1, 1], "repeats"), ([2, 0], "increasing"),
     ([0.0, 1], "integers")],
)  # fmt: skip
def test_keep_layers_are_validated(teacher, keep, message):
    with pytest.raises(ValueError, match=message):
        check_keep_layers(keep, 4)
    with pytest.raises(ValueError, match=message):
        prune_layers(teacher, keep)


def test_pruned_model_shares_nothing_and_leaves_teacher_intact(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_layers(teacher, [1, 3])

    assert student.config.num_hidden_layers == 2 and len(decoder_layers(student)) == 2
    assert teacher.config.num_hidden_layers == 4 and len(decoder_layers(teacher)) == 4
    assert student.config is not teacher.config
    assert [layer.self_attn.layer_idx for layer in decoder_layers(student)] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in decoder_layers(teacher)] == [0, 1, 2, 3]
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    torch.testing.assert_close(
        decoder_layers(student)[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight
    )

    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("keep", [[0, 2], [1, 3], [3], [0, 1, 2, 3]])
def test_hidden_states_equal_kept_layers_run_in_sequence(teacher, keep):
    student = prune_layers(teacher, keep)
    input_ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        out = student(input_ids, output_hidden_states=True)
        expected = hand_run(teacher, keep, input_ids)

    assert len(out.hidden_states) == len(keep) + 1
    for i in range(len(keep) - 1):
        torch.testing.assert_close(out.hidden_states[i + 1], expected[i])
    # transformers puts the final-normed state in the last slot, and the logits read it through the LM head.
    last = teacher.model.norm(expected[-1])
    torch.testing.assert_close(out.hidden_states[-1], last)
    torch.testing.assert_close(out.logits, teacher.lm_head(last))


def test_pruned_model_generates_with_kv_cache(teacher):
    student = prune_layers(teacher, [1, 3])  # layer_idx 1, 3 would address cache slots a 2-layer cache lacks
    assert_cache_matches_full_pass(student, torch.randint(1, 99, (2, 5)), steps=6)


def test_layer_types_follow_the_kept_layers():
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen3Config(**SIZES, head_dim=8, layer_types=types, use_sliding_window=True, sliding_window=4)
    teacher = Qwen3ForCausalLM(config).eval()
    student = prune_layers(teacher, [1, 2])

    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert teacher.config.layer_types == types
    assert_cache_matches_full_pass(student, torch.randint(1, 99, (1, 6)), steps=5)


def test_pruned_layer_map():
    keep = every_kth(30, 2)
    assert pruned_layer_map(keep, 30) == [(i, 2 * i + 1) for i in range(15)]
    assert pruned_layer_map(keep, 30, target="same") == [(i, 2 * i) for i in range(15)]
    # Uneven blocks: student 0 stands in for teacher 0..2, student 1 for teacher 3 (the last layer).
    assert pruned_layer_map([0, 3], 4) == [(0, 2), (1, 3)]
    assert pruned_layer_map([1, 2], 4) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="out of range"):
        pruned_layer_map([0, 30], 30)
    with pytest.raises(ValueError, match="target"):
        pruned_layer_map([0, 2], 4, target="middle")
