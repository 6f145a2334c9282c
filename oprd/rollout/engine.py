"""Rollout engines: what turns prompts into a `Rollout` sampled from the student's current policy.

The default, `hf`, is Hugging Face `generate` on the live student (`oprd.rollout.sampling.rollout`).
`register_engine` makes another engine selectable as `rollout.engine`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

from torch import Tensor, nn

from oprd.rollout.sampling import Rollout, RolloutConfig, rollout


class RolloutEngine(ABC):
    """Turns left-padded prompts into a `Rollout` sampled from the student's current policy.

    An engine that keeps its own copy of the weights (vLLM, SGLang) must refresh it in `sync_weights`, which
    DistillModule calls after every optimizer step: rollouts from stale weights are off-policy.
    """

    sync_s: float | None = None
    """Seconds the last weight sync took (None: the engine reads the live model)."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        tokenizer,
        input_ids: Tensor,
        attention_mask: Tensor,
        config: RolloutConfig,
        seed: int | None = None,
        synced_gpus: bool = False,
    ) -> Rollout:
        """Sample `config.num_generations` responses per prompt (`input_ids`: `[b, p]`, left-padded)."""

    def sync_weights(self, model: nn.Module, step: int) -> None:
        """Copy the student's weights into the engine after optimizer step `step` (no-op for engines that read the
        live model)."""
        return None

    def sleep(self) -> None:
        """Free what the engine holds on the accelerator while the trainer updates (no-op by default)."""
        return None

    def wake(self) -> None:
        """Take back what `sleep` freed, before the next rollout."""
        return None


class HFGenerateEngine(RolloutEngine):
    """`model.generate` with KV cache on the live student (the default): see `rollout`."""

    def generate(self, model, tokenizer, input_ids, attention_mask, config, seed=None, synced_gpus=False) -> Rollout:
        return rollout(model, tokenizer, input_ids, attention_mask, config, seed=seed, synced_gpus=synced_gpus)


ENGINES: dict[str, type[RolloutEngine] | str] = {"hf": HFGenerateEngine, "vllm": "oprd.rollout.vllm:VLLMEngine"}
"""Engine name -> class, or `module:Class` imported on first use (an optional dependency never loads before)."""


def register_engine(name: str, engine: type[RolloutEngine]) -> None:
    """Make `engine` selectable as `rollout.engine: <name>` (call it before the module is built)."""
    if not (isinstance(engine, type) and issubclass(engine, RolloutEngine)):
        raise TypeError(f"A rollout engine must subclass RolloutEngine, got {engine!r}.")
    ENGINES[name] = engine


def get_engine(name: str) -> RolloutEngine:
    """A fresh engine by name, with an error that lists the registered ones."""
    if name not in ENGINES:
        raise ValueError(
            f"Unknown rollout engine {name!r}; registered: {', '.join(sorted(ENGINES))}. Register your own with "
            "oprd.rollout.register_engine."
        )
    engine = ENGINES[name]
    if isinstance(engine, str):
        module, _, attribute = engine.partition(":")
        engine = getattr(importlib.import_module(module), attribute)
    return engine()
