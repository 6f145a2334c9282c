import json
import re

import pytest

from oprd.data import REPHRASINGS, PromptDataModule, arithmetic_examples, format_prompts, load_prompts, read_jsonl


def test_arithmetic_is_seeded_and_splits_are_disjoint():
    train, val = arithmetic_examples("train", seed=3), arithmetic_examples("val", seed=3)
    assert len(val) == 100 and len(train) == 300
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in val}
    assert arithmetic_examples("val", seed=3) == val and arithmetic_examples("val", seed=4) != val
    first = val[0]
    a, b = (int(w) for w in first["prompt"].removeprefix("What is ").removesuffix("?").split(" plus "))
    assert first["answer"] == str(a + b)


def test_jsonl_reading_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "Hi", "answer": 3}\n\n{"prompt": "Yo"}\n')
    assert read_jsonl(good) == [
        {"prompt": "Hi", "answer": "3", "response": None},
        {"prompt": "Yo", "answer": None, "response": None},
    ]
    cases = {
        '{"prompt": "a"}\n[1, 2]\n': "p.jsonl:2: expected an object",
        '{"prompt": "a"}\n{"question": "b"}\n': 'p.jsonl:2: missing a non-empty "prompt"',
        '{"prompt": "a"}\n{oops\n': "p.jsonl:2: not valid JSON",
        "\n\n": "holds no prompts",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_jsonl(good)
    with pytest.raises(ValueError, match="Cannot read prompt file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="neither a built-in"):
        load_prompts(str(tmp_path / "nothing"))


def test_hf_datasets_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "A?", "answer": "1"}]),
            "val": datasets.Dataset.from_list([{"prompt": "B?", "answer": "2"}]),
        }
    ).save_to_disk(str(folder))
    assert load_prompts(str(folder), "val") == [{"prompt": "B?", "answer": "2", "response": None}]
    with pytest.raises(ValueError, match="has splits"):
        load_prompts(str(folder), "test")


def test_chat_template_and_left_padding(tokenizer):
    enc = format_prompts(tokenizer, ["What is 1 plus 2?", "Hi"])
    text = tokenizer.decode(enc["input_ids"][1][enc["attention_mask"][1].bool()])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1


def test_long_prompts_truncated_or_refused(tokenizer, caplog):
    long = "word " * 50
    enc = format_prompts(tokenizer, [long], max_length=16)
    assert enc["input_ids"].shape[1] == 16 and "truncated" in caplog.text
    with pytest.raises(ValueError, match="max_prompt_length=16"):
        format_prompts(tokenizer, [long], max_length=16, truncate=False)


def test_datamodule_batches(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "answer": str(i)}) for i in range(5)))
    dm = PromptDataModule(train="arithmetic", val=str(path), batch_size=4, val_batch_size=2, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 4 and all(p.startswith("What is") for p in batch["prompt"])
    again = PromptDataModule(train="arithmetic", batch_size=4, seed=1)
    again.setup("fit")
    assert next(iter(again.train_dataloader()))["prompt"] == batch["prompt"]  # seeded shuffling
    assert [len(b["prompt"]) for b in dm.val_dataloader()] == [2, 2, 1]


@pytest.mark.parametrize("seed,num_val", [(0, 100), (3, 100), (0, 250), (7, 1)])
def test_the_other_sets_ask_pairs_of_their_own_never_the_training_or_held_out_splits(seed, num_val):
    # A final-only set that re-asked the held-out pairs would not be independent of the rate chosen on them.
    asked = {
        split: {_pair(x) for x in arithmetic_examples(split, seed=seed, num_val=num_val)} for split in ("train", "val")
    }
    assert len(asked["train"]) + len(asked["val"]) == 400  # every pair of 1..20, each read back from its prompt
    for source in ("arithmetic-rephrased", "arithmetic-large"):
        for split in ("val", "train"):
            items = load_prompts(source, split, seed=seed, num_val=num_val)
            pairs = {_pair(x) for x in items}
            assert len(pairs) == len(items) and not pairs & asked["train"] and not pairs & asked["val"]
            assert all(item["answer"] == str(sum(_pair(item))) for item in items)
    rephrased = load_prompts("arithmetic-rephrased", "val", seed=seed, num_val=num_val)
    assert not any(item["prompt"].startswith("What is ") for item in rephrased)  # its own phrasings
    # The same pairs as the larger sums in the training phrasing: the two sets differ in phrasing alone.
    assert [_pair(x) for x in rephrased] == [_pair(x) for x in load_prompts("arithmetic-large", "val", seed, num_val)]


@pytest.mark.parametrize("seed,num_val", [(0, 100), (3, 100)])
def test_the_wide_task_trains_on_both_ranges_and_holds_out_what_the_other_sets_ask(seed, num_val):
    train = load_prompts("arithmetic-wide", "train", seed=seed, num_val=num_val)
    assert train == arithmetic_examples("train", seed, num_val) + load_prompts(
        "arithmetic-large", "train", seed, num_val
    )
    assert all(item["prompt"].startswith("What is ") and item["response"] for item in train)  # the training phrasing
    held_out = {
        _pair(x) for source in ("arithmetic-large", "arithmetic-rephrased") for x in load_prompts(source, "val", seed)
    }
    assert not {_pair(x) for x in train} & held_out
    assert load_prompts("arithmetic-wide", "val", seed, num_val) == arithmetic_examples("val", seed, num_val)


@pytest.mark.parametrize("seed,num_val", [(0, 100), (3, 100)])
def test_the_varied_task_asks_the_wide_pairs_again_in_half_the_rephrasings(seed, num_val):
    wide = load_prompts("arithmetic-wide", "train", seed=seed, num_val=num_val)
    train = load_prompts("arithmetic-varied", "train", seed=seed, num_val=num_val)
    assert train[: len(wide)] == wide and len(train) == 2 * len(wide)
    again = train[len(wide) :]
    assert [_pair(x) for x in again] == [_pair(x) for x in wide]
    assert all(x["answer"] == w["answer"] and x["response"] == w["response"] for x, w in zip(again, wide, strict=True))
    trained = {_phrasing(x) for x in again}
    assert trained == set(REPHRASINGS[0::2])  # each of the trained half, none of the other
    held_out = load_prompts("arithmetic-rephrased", "val", seed=seed, num_val=num_val)
    assert not {_pair(x) for x in train} & {_pair(x) for x in held_out}
    assert [_phrasing(x) in trained for x in held_out[:4]] == [True, False, True, False]  # every other prompt
    assert load_prompts("arithmetic-varied", "val", seed, num_val) == arithmetic_examples("val", seed, num_val)


def _phrasing(item: dict) -> str:
    a, b = _pair(item)
    return item["prompt"].replace(str(a), "{a}", 1).replace(str(b), "{b}", 1)


def _pair(item: dict) -> tuple[int, int]:
    a, b = re.findall(r"\d+", item["prompt"])
    return int(a), int(b)
