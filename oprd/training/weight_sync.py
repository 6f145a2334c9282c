"""Engines that sample from their own copy of the student's weights (vLLM) get the new weights after each optimizer
step: `WeightSync`, a callback around the rollout engine's `sync_weights`."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class WeightSync(Callback):
    """After each optimizer step, hand the student's weights to the rollout engine (which copies them when its own
    schedule says so) and log `train/weight_sync_s` when it took any time.

    Args:
        pair: what holds the rollout engine and the student (`oprd.pair.ModelPair`: its `engine`, `student`), read at
            each step, so an engine swapped in later is the one synced.
    """

    def __init__(self, pair) -> None:
        self.pair, self.synced_step = pair, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.synced_step:  # no optimizer step ended with this micro-batch
            return
        self.synced_step, engine = trainer.global_step, self.pair.engine
        engine.sync_weights(self.pair.student, self.synced_step)
        if engine.sync_s is not None:
            pl_module.log("train/weight_sync_s", engine.sync_s, batch_size=1)
