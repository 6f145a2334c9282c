import pytest
import torch

from oprd.data import format_prompts
from oprd.rollout import RolloutConfig, response_mask, rollout
from tests.helpers import tiny_llama


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 6, 2, 0, 0], [2, 7, 7, 7, 7], [5, 5, 5, 5, 5]])
    assert response_mask(responses, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_masks_padding_and_reproducibility(tokenizer):
    model = tiny_llama(vocab=len(tokenizer)).train()
    enc = format_prompts(tokenizer, ["What is 1 plus 2?", "Hi"])
    config = RolloutConfig(max_new_tokens=12, num_generations=3)
    roll = rollout(model, tokenizer, enc["input_ids"], enc["attention_mask"], config, seed=7)
    assert model.training  # mode restored
    b, t = roll.input_ids.shape
    assert b == 6 and t == enc["input_ids"].shape[1] + roll.input_ids.shape[1] - roll.prompt_length
    assert roll.response_mask[:, : roll.prompt_length].sum() == 0  # never the prompt
    assert enc["attention_mask"][1, 0] == 0  # left padding: the short prompt is padded on the left
    eos = tokenizer.eos_token_id
    for row, mask in zip(roll.input_ids, roll.response_mask, strict=True):
        resp, kept = row[roll.prompt_length :], mask[roll.prompt_length :].bool()
        hits = (resp == eos).nonzero()
        if len(hits):  # everything after the first EOS is excluded, the EOS itself kept
            first = int(hits[0])
            assert kept[: first + 1].all() and not kept[first + 1 :].any()
        else:
            assert kept.all()
    assert torch.equal(roll.attention_mask[:, roll.prompt_length :], roll.response_mask[:, roll.prompt_length :])
    again = rollout(model, tokenizer, enc["input_ids"], enc["attention_mask"], config, seed=7)
    assert torch.equal(roll.input_ids, again.input_ids)
    other = rollout(model, tokenizer, enc["input_ids"], enc["attention_mask"], config, seed=8)
    assert not torch.equal(roll.input_ids, other.input_ids)


def test_rollout_does_not_touch_the_callers_rng(tokenizer):
    model = tiny_llama(vocab=len(tokenizer))
    enc = format_prompts(tokenizer, ["Hi"])
    torch.manual_seed(0)
    rollout(model, tokenizer, enc["input_ids"], enc["attention_mask"], RolloutConfig(max_new_tokens=4), seed=3)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_greedy_rollout_matches_manual_decoding(tokenizer):
    model = tiny_llama(vocab=len(tokenizer))
    enc = format_prompts(tokenizer, ["What is 3 plus 4?"])
    roll = rollout(
        model, tokenizer, enc["input_ids"], enc["attention_mask"], RolloutConfig(max_new_tokens=5, do_sample=False)
    )
    ids = enc["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if nxt.item() == tokenizer.eos_token_id:
                break
    assert torch.equal(roll.input_ids[0, : ids.shape[1]], ids[0])


def test_rollout_config_errors():
    with pytest.raises(ValueError, match="at least 1"):
        RolloutConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="do_sample: false"):
        RolloutConfig(temperature=0)
