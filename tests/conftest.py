"""Shared fixtures: tiny random models and the offline tokenizer; W&B kept offline and inside tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from oprd.models import TINY_STUDENT, TINY_TEACHER, ModelSpec, tiny_tokenizer
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
TEACHER, STUDENT = TINY_TEACHER, TINY_STUDENT


def make_module(**kwargs) -> DistillModule:
    """A DistillModule on the tiny random teacher and student (`configs/tiny.yaml`'s models)."""
    defaults = dict(
        teacher=ModelSpec(config=TEACHER, seed=1),
        student=ModelSpec(config=STUDENT, seed=2),
        tokenizer="tiny",
        rollout=RolloutConfig(max_new_tokens=8),
        optim=OptimConfig(lr=1e-3),
        max_prompt_length=64,
    )
    return DistillModule(**{**defaults, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer: no logger, checkpoints, progress bar or validation unless asked."""
    defaults = dict(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def tiny_llama(layers: int = 3, width: int = 32, vocab: int = 384, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen3(layers: int = 3, width: int = 32, vocab: int = 384, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    return Qwen3ForCausalLM(config).eval()


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
