"""Throughput and memory per training step, logged as `train/` metrics.

* `train/rollout_tokens_per_s`: response tokens sampled per second of rollout.
* `train/update_tokens_per_s`: sequence tokens (prompt + response) per second of everything after the rollout:
  teacher pass, student pass, losses, backward, and the optimizer step when this micro-batch ends one.
* `train/tokens_per_s`: sequence tokens per second of the whole micro-batch (rollout + update).
* `train/peak_memory_gb` (CUDA): `torch.cuda.max_memory_allocated` during this micro-batch (reset at its start): the
  process's absolute peak, weights, optimizer state and the rollout's KV cache included. What the update itself
  takes is `oprd.training.memory.UpdateMemory`, which a `StepMeter` runs around the update when given one.
* `train/peak_rss_gb` (CPU): the process's peak resident set size so far (`getrusage`; the OS cannot reset it, so
  it is a running maximum, not a per-step figure).

Each rank measures its own; the logger records rank 0's. A micro-batch that was skipped (non-finite) logs nothing.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterable, Iterator

import torch
from lightning.pytorch.callbacks import Callback

from oprd.training.memory import UpdateMemory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """`{"train/peak_memory_gb": ...}` on CUDA, `{"train/peak_rss_gb": ...}` elsewhere."""
    if device.type == "cuda":
        return {"train/peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"train/peak_rss_gb": peak / (2**30 if sys.platform == "darwin" else 2**20)}


class StepMeter(Callback):
    """Times one micro-batch in two phases: rollout, then update (see the module docstring for the metrics); as a
    callback, from the micro-batch's start to its end, the training step marking the rollout's end (`rollout_done`).

    Attributes:
        memory: measures the update's memory when set (`begin` once the rollout is done, `end` when the micro-batch
            ends; the one who sets it closes it).
        last: the metrics of the last finished micro-batch (also when they were not logged, e.g. a skipped step).
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.started = self.rollout_end = None
        self.rollout_tokens = self.sequence_tokens = 0
        self.memory: UpdateMemory | None = None
        self.last: dict[str, float] = {}
        self._rollout_peak = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.start(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # After the backward and (when this micro-batch ends a step) the optimizer step: the update's full time.
        metrics = self.finish(self.sequence_tokens)
        if metrics and outputs:  # no outputs: the training step skipped the micro-batch
            pl_module.log_dict(metrics, batch_size=1)

    def start(self, device: torch.device) -> None:
        self.device = device
        reset_peak_memory(device)
        self.started, self.rollout_end, self.rollout_tokens = time.perf_counter(), None, 0

    def rollout_done(self, response_tokens: int, sequence_tokens: int) -> None:
        """The rollout ended: `response_tokens` were sampled; the update will read `sequence_tokens`."""
        self._sync()
        self.rollout_end, self.rollout_tokens = time.perf_counter(), response_tokens
        self.sequence_tokens = sequence_tokens
        if self.memory is not None:
            if self.device.type == "cuda":  # the probe resets the peak counter: keep the rollout's for the absolute
                self._rollout_peak = torch.cuda.max_memory_allocated(self.device)
            self.memory.begin()

    def finish(self, sequence_tokens: int) -> dict[str, float]:
        """The micro-batch's metrics; empty when no rollout was timed (e.g. `start` was not called)."""
        if self.started is None or self.rollout_end is None:
            return {}
        self._sync()
        end = time.perf_counter()
        if self.memory is not None:
            self.memory.end()
        rollout_s, update_s = self.rollout_end - self.started, end - self.rollout_end
        metrics = {
            "train/rollout_tokens_per_s": self.rollout_tokens / max(rollout_s, 1e-9),
            "train/update_tokens_per_s": sequence_tokens / max(update_s, 1e-9),
            "train/tokens_per_s": sequence_tokens / max(rollout_s + update_s, 1e-9),
            "train/rollout_s": rollout_s,
            "train/update_s": update_s,
            **peak_memory(self.device),
        }
        if "train/peak_memory_gb" in metrics:
            metrics["train/peak_memory_gb"] = max(metrics["train/peak_memory_gb"], self._rollout_peak / 2**30)
        self.started = self.rollout_end = None
        self._rollout_peak = 0
        self.last = metrics
        return metrics

    def _sync(self) -> None:
        # CUDA kernels run asynchronously: without a sync the clock stops before the work does.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class SavedBytes:
    """Count bytes of unique storages saved for backward inside the context, ignoring `existing` tensors' storages.

    Args:
        existing: tensors (inputs, parameters) whose storages live anyway and so are not charged to the region.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        self.skip = {storage_key(t) for t in existing}
        self.seen: dict[tuple[int, int], int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self.skip and key[1] > 0:
            self.seen[key] = key[1]
        return tensor

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self
