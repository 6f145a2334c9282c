"""What `oprd compare` measures inside each run: held-out scores every N steps, training time and update memory.

Training time counts training steps only (rollout and update), never the evaluations. Update memory is, on CUDA,
the peak allocated during the step (`train/peak_memory_gb`), and on CPU, which has no resettable peak, the bytes the
update saves for backward (activations of the student pass, the objective and the LM head; deterministic).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import lightning as L

from oprd.evaluation.scoring import mean_over_batches, score
from oprd.training.throughput import SavedBytes

METRICS = ("reverse_kl", "accuracy", "repetition", "distinct_4", "cos", "response_length")
"""Held-out metrics a comparison reports (`cos`: mean over the objective's layer pairs, or of the final states)."""


def evaluate(module, items: list[dict], batch_size: int) -> dict[str, float]:
    """Greedy answers to `items`, scored as `oprd validate` scores them; means weighted by batch size."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        metrics, _ = score(module, [x["prompt"] for x in chunk], [x["answer"] for x in chunk])
        values = {k: v for k, v in metrics.items() if not k.startswith("cos/")}
        pairs = [float(v) for k, v in metrics.items() if k.startswith("cos/")]
        if pairs or "cos_final" in values:
            values["cos"] = sum(pairs) / len(pairs) if pairs else float(values["cos_final"])
        batches.append((values, len(chunk)))
    return mean_over_batches(batches)


class CompareProbe(L.Callback):
    """Scores held-out prompts at the start, every `every` optimizer steps and at the end; times steps; measures update
    memory.

    Lightning runs callbacks' `on_train_batch_end` before the module's, so what the step logged and the evaluation it
    calls for are taken at the start of the next batch (or at the end of training), outside the module's step timer.

    Args:
        heldout: split name -> items (`selection` picks the learning rate, `test` reports it).
        every: optimizer steps between evaluations.
        batch_size: prompts per evaluation batch.
        budget_s: stop after this many seconds of training (None: the Trainer's `max_steps`).
        final_only: split name -> items scored once, on the final weights (e.g. prompts phrased differently).
    """

    def __init__(
        self,
        heldout: dict[str, list[dict]],
        every: int,
        batch_size: int,
        budget_s: float | None = None,
        final_only: dict[str, list[dict]] | None = None,
    ) -> None:
        self.heldout, self.every, self.batch_size, self.budget_s = heldout, every, batch_size, budget_s
        self.final_only = final_only or {}
        self.rows: list[dict[str, Any]] = []
        self.train_s, self.update_s, self.memory = 0.0, [], []
        self._started, self._saved, self._stack = 0.0, None, contextlib.ExitStack()
        self._read_step, self._due = 0, False

    def _evaluate(self, module, step: int, sets: dict[str, list[dict]]) -> None:
        was_training = module.training
        module.eval()
        for split, items in sets.items():
            scores = evaluate(module, items, self.batch_size)
            self.rows.append({"step": step, "split": split, "train_s": self.train_s, **scores})
            if module.logger is not None:  # the held-out curves of every run, side by side in the W&B group
                module.logger.log_metrics({f"compare/{split}/{k}": v for k, v in scores.items()}, step=step)
        module.train(was_training)

    def _take_finished_step(self, trainer, module) -> None:
        """What the last optimizer step logged, and the evaluation it calls for."""
        if trainer.global_step == self._read_step:
            return
        self._read_step = trainer.global_step
        metrics = trainer.callback_metrics
        if "train/update_s" in metrics:
            self.update_s.append(float(metrics["train/update_s"]))
        if "train/peak_memory_gb" in metrics:
            self.memory.append(float(metrics["train/peak_memory_gb"]) * 1024)
        if self._due:
            self._evaluate(module, trainer.global_step, self.heldout)
            self._due = False

    def on_train_start(self, trainer, module) -> None:
        self._read_step = trainer.global_step
        self._evaluate(module, trainer.global_step, self.heldout)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._take_finished_step(trainer, module)
        self._started = time.perf_counter()
        if module.device.type != "cuda":
            self._saved = self._stack.enter_context(_saved_bytes(module).track())

    def on_before_backward(self, trainer, module, loss) -> None:
        self._stack.close()  # the forward is done: what it saved for backward is counted

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._stack.close()
        self.train_s += time.perf_counter() - self._started
        if self._saved is not None:
            self.memory.append(self._saved.total / 2**20)
        step = trainer.global_step
        if self.budget_s is not None and self.train_s >= self.budget_s:
            trainer.should_stop = True
        if step != self._read_step and (step % self.every == 0 or step >= trainer.max_steps or trainer.should_stop):
            self._due = True

    def on_train_end(self, trainer, module) -> None:
        self._take_finished_step(trainer, module)
        if self.rows[-1]["step"] != trainer.global_step:
            self._evaluate(module, trainer.global_step, self.heldout)
        self._evaluate(module, trainer.global_step, self.final_only)

    def summary(self) -> dict[str, float | None]:
        """Median update seconds per step and peak update memory (MiB) over the run."""
        median = sorted(self.update_s)[len(self.update_s) // 2] if self.update_s else None
        return {"update_s": median, "update_mib": max(self.memory) if self.memory else None, "train_s": self.train_s}


def _saved_bytes(module) -> SavedBytes:
    return SavedBytes([*module.parameters(), *module.pair.teacher.parameters()])
