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
    DistillModule calls after every optimizer step: rollouts from stale weights are off-policy. DistillModule brackets
    each training rollout with `wake` and `sleep`; inside that bracket the copy may lag the student by up to
    `rollout.sync_every - 1` updates (the price of syncing less often), but a `generate` outside it (held-out scoring,
    reports, predictions, calibration) must sample the live weights: it wakes the engine and syncs first.
    """

    sync_s: float | None = None
    """Seconds the last weight sync took (None: the engine reads the live model)."""
    whole_weights: bool = False
    """The engine copies the student's whole weights on each rank, which a sharded strategy (FSDP) does not hold."""

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
        """End a training rollout: free what the engine holds on the accelerator while the trainer updates (no-op by
        default)."""
        return None

    def wake(self) -> None:
        """Start a training rollout: take back what `sleep` freed."""
        return None

    def on_save_checkpoint(self, model: nn.Module) -> None:
        """A checkpoint of `model` is being saved: bring the engine's copy up to it, so that a run resumed from the
        checkpoint (whose engine starts from these weights) samples what this run samples (no-op by default)."""
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


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine class registered as `name`, with an error that lists the registered ones."""
    if name not in ENGINES:
        raise ValueError(
            f"Unknown rollout engine {name!r}; registered: {', '.join(sorted(ENGINES))}. Register your own with "
            "oprd.rollout.register_engine."
        )
    engine = ENGINES[name]
    if isinstance(engine, str):
        module, _, attribute = engine.partition(":")
        engine = getattr(importlib.import_module(module), attribute)
    return engine


def get_engine(name: str) -> RolloutEngine:
    """A fresh engine by name, with an error that lists the registered ones."""
    return engine_class(name)()


SHARDED_STRATEGIES = ("fsdp", "deepspeed", "modelparallel")
"""Lower-case prefixes of the strategy names and class names that shard the student's weights across ranks."""


def check_strategy(name: str, strategy) -> None:
    """Refuse an engine that copies the student's whole weights under a strategy that shards them (before any model
    loads): each rank would hand the engine its shards only.

    Args:
        name: the `rollout.engine` setting.
        strategy: `trainer.strategy` as parsed: a registered name (`fsdp2`), a class path, or a strategy object.
    """
    if not engine_class(name).whole_weights:
        return
    given = getattr(strategy, "class_path", None) or strategy
    given = given if isinstance(given, str) else type(given).__name__
    if given.rsplit(".", 1)[-1].lower().startswith(SHARDED_STRATEGIES):
        raise ValueError(
            f"--model.rollout.engine {name} cannot run under --trainer.strategy {given}: the engine needs the "
            "student's whole weights on each rank and a sharded strategy holds a shard; use --trainer.strategy ddp "
            "(or auto on one device), or --model.rollout.engine hf."
        )
