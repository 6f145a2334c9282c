"""What `oprd compare` measures inside each run: held-out scores every N steps, training time and update memory.

* Training seconds are what a user's wall clock counts while the run trains, the same way for every objective: the
  Bridge's calibration, every optimizer step from the start of its first micro-batch to the start of the next step
  (rollouts, update, optimizer step, weight sync to a rollout engine, the loop's own work), and nothing of the
  held-out evaluations. With `budget_s`, a run stops before a step that would overshoot the budget (a step is
  predicted to take the median of those before it, or the last one's seconds when that is more) and reports the
  seconds it actually trained.
* Update memory is measured on one optimizer step (the second; the first if it is the only one): the peak of bytes
  allocated during its update windows (after each rollout: teacher and student passes, losses, backward, optimizer
  step) above what was allocated when they began (`oprd.training.memory`; CUDA allocator counters, or on CPU a
  replay of the profiler's allocation events). The profiler slows that step, so its seconds are left out of the
  clock and the update seconds, and the clock counts it at the median of the other steps instead.
* Update seconds per step: the median over the unprobed optimizer steps of their micro-batches' update seconds.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import lightning as L

from oprd.distiller import Distiller
from oprd.evaluation.scoring import mean_over_batches, score_by_teacher
from oprd.training.memory import UpdateMemory, memory_kind

log = logging.getLogger(__name__)

METRICS = ("reverse_kl", "accuracy", "repetition", "distinct_4", "cos", "response_length")
"""Held-out metrics a comparison reports (`cos`: mean over the objective's layer pairs, or of the final states)."""


def evaluate(distiller: Distiller, items: list[dict], batch_size: int) -> dict[str, float]:
    """Greedy answers to `items`, scored as `oprd validate` scores them (each prompt by its own teacher); means
    weighted by the prompts scored."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts, answers = [x["prompt"] for x in chunk], [x["answer"] for x in chunk]
        groups, _ = score_by_teacher(distiller, prompts, answers, [x.get("teacher") for x in chunk])
        for metrics, size in groups.values():
            values = {k: v for k, v in metrics.items() if not k.startswith("cos/")}
            pairs = [float(v) for k, v in metrics.items() if k.startswith("cos/")]
            if pairs or "cos_final" in values:
                values["cos"] = sum(pairs) / len(pairs) if pairs else float(values["cos_final"])
            batches.append((values, size))
    return mean_over_batches(batches)


class CompareProbe(L.Callback):
    """Scores held-out prompts at the start, every `every` optimizer steps and at the end; keeps the training clock;
    measures one step's update memory (see the module docstring).

    Lightning runs callbacks' hooks before the module's: an optimizer step's end (the module's timing, weight sync)
    is only complete at the start of the next batch, so a step is closed there (or at the end of training), and the
    evaluation it calls for runs then, with the clock stopped.

    Args:
        heldout: split name -> items (`selection` picks the learning rate, `test` reports it).
        every: optimizer steps between evaluations.
        batch_size: prompts per evaluation batch.
        budget_s: training seconds the run may take (None: the Trainer's `max_steps`).
        final_only: split name -> items scored once, on the final weights (e.g. prompts phrased differently).
        name: the run's name in progress lines (e.g. `run 2 of 4: oprd-lr0.003`).
    """

    def __init__(
        self,
        heldout: dict[str, list[dict]],
        every: int,
        batch_size: int,
        budget_s: float | None = None,
        final_only: dict[str, list[dict]] | None = None,
        name: str = "run",
    ) -> None:
        self.heldout, self.every, self.batch_size, self.budget_s = heldout, every, batch_size, budget_s
        self.final_only, self.name = final_only or {}, name
        self.rows: list[dict[str, Any]] = []
        self.calibrate_s = 0.0
        self.step_s: dict[int, float] = {}
        """Seconds of every unprobed optimizer step, by the step count after it."""
        self.update_s: list[float] = []
        """Update seconds of every unprobed optimizer step (summed over its micro-batches)."""
        self.probed: tuple[int, float] | None = None
        """The probed step (the step count after it) and its seconds (profiler included: not in the clock)."""
        self.memory_mib: float | None = None
        self.memory_kind: str | None = None
        self._memory: UpdateMemory | None = None
        self._probe_step = 0
        self._step_start: float | None = None
        self._step_number = -1
        self._step_update_s = 0.0
        self._wall_start = 0.0

    # ---- the clock ----------------------------------------------------------------------------------------------

    def clock(self, step: float = float("inf")) -> float:
        """Training seconds up to `step` (default: so far): calibration, every closed step up to it, the probed one at
        the median of the others (its own seconds, if it is the only one)."""
        seconds = self.calibrate_s + sum(s for number, s in self.step_s.items() if number <= step)
        if self.probed is not None and self.probed[0] <= step:
            seconds += statistics.median(self.step_s.values()) if self.step_s else self.probed[1]
        return seconds

    @property
    def train_s(self) -> float:
        return self.clock()

    # ---- hooks --------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer, module) -> None:
        self._wall_start = time.perf_counter()
        # The Bridge calibrates before any score (uncalibrated, it scores cosine 0 whatever the student), and its
        # seconds are training seconds: a user waits for them.
        started = time.perf_counter()
        module.calibrate()
        self.calibrate_s = time.perf_counter() - started
        single = 0 <= trainer.max_steps <= trainer.global_step + 1  # one step to go: probe it
        self._probe_step = trainer.global_step + (0 if single else 1)
        self._evaluate(module, trainer.global_step, self.heldout)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._close_step(trainer, module)
        if self._step_start is None:  # the first micro-batch of an optimizer step
            self._step_start, self._step_update_s = time.perf_counter(), 0.0
            self._step_number = trainer.global_step
            if trainer.global_step == self._probe_step and self.memory_mib is None:
                self._memory = UpdateMemory(module.device)
        else:
            self._step_update_s += module.meter.last.get("train/update_s", 0.0)
        module.meter.last = {}
        module.meter.memory = self._memory

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_number or self.budget_s is None:
            return
        # An optimizer step ended: stop before the next one if it would overshoot. This step's weight sync is still
        # to come (it is counted when the step closes); the probed step counts at the median of the others.
        this = time.perf_counter() - self._step_start
        if self._memory is not None and self.step_s:
            this = statistics.median(self.step_s.values())
        # The next step is predicted to cost at least this one: steps that grow dearer (a warm start turning
        # on-policy, longer responses) would overshoot a prediction by the median alone.
        next_s = max(this, statistics.median([*self.step_s.values(), this]))
        if self.train_s + this + next_s > self.budget_s:
            trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        self._close_step(trainer, module)
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            self._evaluate(module, trainer.global_step, self.heldout)
        self._evaluate(module, trainer.global_step, self.final_only)
        for row in self.rows:  # the probed step's estimate is final only now: every row on the same clock
            row["train_s"] = self.clock(row["step"])

    # ---- closing a step -----------------------------------------------------------------------------------------

    def _close_step(self, trainer, module) -> None:
        """Close the optimizer step that ended (if one did): its seconds, update seconds and memory; then evaluate."""
        if self._step_start is None or trainer.global_step == self._step_number:
            return
        seconds = time.perf_counter() - self._step_start
        update_s = self._step_update_s + module.meter.last.get("train/update_s", 0.0)
        self._step_start = None
        if self._memory is not None:
            module.meter.memory = None
            peak = self._memory.close()
            self._memory = None
            self.probed = (trainer.global_step, seconds)
            if peak is not None:
                self.memory_mib, self.memory_kind = peak / 2**20, memory_kind(module.device)
            else:  # no update ran (e.g. a skipped step): measure the next one
                self._probe_step = trainer.global_step
        else:
            self.step_s[trainer.global_step] = seconds
            self.update_s.append(update_s)
        step = trainer.global_step
        if step % self.every == 0 or 0 <= trainer.max_steps <= step or trainer.should_stop:
            self._evaluate(module, step, self.heldout)
            self._progress(trainer, step)

    def _progress(self, trainer, step: int) -> None:
        wall = time.perf_counter() - self._wall_start
        done = step - self.rows[0]["step"] if self.rows else step
        if self.budget_s is not None:
            left = max(self.budget_s - self.train_s, 0.0) * wall / max(self.train_s, 1e-9)
            where = f"step {step}, {self.train_s:.0f} of {self.budget_s:.0f} training seconds"
        elif trainer.max_steps >= 0:
            left = (trainer.max_steps - step) * wall / max(done, 1)
            where = f"step {step} of {trainer.max_steps}"
        else:  # bounded by epochs: no estimate
            log.info("compare: %s: step %d", self.name, step)
            return
        log.info("compare: %s: %s, about %s left (evaluations included)", self.name, where, _duration(left))

    def _evaluate(self, module, step: int, sets: dict[str, list[dict]]) -> None:
        was_training = module.training
        module.eval()
        for split, items in sets.items():
            scores = evaluate(module.distiller, items, self.batch_size)
            self.rows.append({"step": step, "split": split, "train_s": self.train_s, **scores})
            if module.logger is not None:  # the held-out curves of every run, side by side in the W&B group
                module.logger.log_metrics({f"compare/{split}/{k}": v for k, v in scores.items()}, step=step)
        module.train(was_training)

    def summary(self) -> dict[str, Any]:
        """Median update seconds per step, the probed step's update memory (MiB) and what it is, training seconds."""
        return {
            "update_s": statistics.median(self.update_s) if self.update_s else None,
            "update_mib": self.memory_mib,
            "memory": self.memory_kind,
            "train_s": self.train_s,
            "calibrate_s": self.calibrate_s,
        }


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
