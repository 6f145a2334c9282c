"""What tests import: the repository root, the tiny pair, a module and a Trainer on it, tiny models of two families,
and float64 comparison helpers. Fixtures live in `conftest.py`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from oprd.models import TINY_STUDENT, TINY_TEACHER, ModelSpec
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
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
    return _tiny(LlamaForCausalLM, LlamaConfig, layers, width, vocab, seed)


def tiny_qwen3(layers: int = 3, width: int = 32, vocab: int = 384, seed: int = 0) -> Qwen3ForCausalLM:
    return _tiny(Qwen3ForCausalLM, Qwen3Config, layers, width, vocab, seed, head_dim=8)


def _tiny(model_class, config_class, layers: int, width: int, vocab: int, seed: int, **extra):
    """A seeded random model of `layers` x `width` (4 query heads, 2 key/value heads) in eval mode."""
    torch.manual_seed(seed)
    config = config_class(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        **extra,
    )
    return model_class(config).eval()
