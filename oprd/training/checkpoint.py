"""Checkpoints a user can trust with days of compute: exact resume, nothing lost.

* `AtomicCheckpointIO` writes every checkpoint atomically: a crash mid-write leaves the previous `last.ckpt` intact.
* `ResumableCheckpoint` is the `ModelCheckpoint` that `oprd fit` always adds (`--checkpoint.*` flags, a `checkpoint:`
  YAML section). It stores the RNG states, saves at the end of the current step on SIGTERM or Ctrl-C, saves the
  final step (mid-epoch, so a longer run continues the epoch), and keeps an earlier run's `last.ckpt` when it writes
  its own.
* `check_state_shapes` turns a checkpoint from another model width into an error that names the shapes.

The rest of the state that an exact resume needs is saved by Lightning itself: student and projector weights
(`state_dict`), optimizer and scheduler states, loop progress, and the data position (the train loader is stateful:
`oprd.data.ResumableLoader`). Rollouts draw from a seed derived from the position in the run, not from RNG state.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from oprd.training.rng import rng_states, set_rng_states

log = logging.getLogger(__name__)

# ---- atomic writes ------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` into a file next to `path`, flushed to disk, then renamed over `path` in one step.

    A rename within one folder is atomic: readers (and a resumed run) see the old file or the new one, never half of
    one. The staging name is fixed, so a write killed half-way is overwritten by the next save instead of piling up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself survive a power loss; folders cannot be opened for fsync on Windows.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with atomic, durable local writes (the default plugin of `oprd fit`).

    Lightning's own writer stages the file in the system temp folder and moves it into place: across file systems
    that move is a copy, so a crash mid-copy truncates `last.ckpt` (and orphans a checkpoint-sized file in /tmp).
    Remote paths (`s3://`, `gs://`) keep Lightning's behaviour: object stores publish whole objects only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def free_name(path: Path, stem: str, suffix: str) -> Path:
    """`<stem>-<time path was written><suffix>` beside `path`, numbered (`-1`, `-2`, ...) past any that exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{stem}-{stamp}{suffix}")
    for n in range(1, 1000):
        if not kept.exists():
            break
        kept = path.with_name(f"{stem}-{stamp}-{n}{suffix}")
    return kept


def keep_aside(last: str | Path) -> Path:
    """Give an earlier run's `last.ckpt` a name of its own, `earlier-run-<time of writing>.ckpt`, next to it.

    A hard link: `last.ckpt` stays in place until the caller replaces it atomically, so no moment and no crash leaves
    the folder without the earlier run's checkpoint (a copy where the file system has no hard links).

    Returns:
        the earlier run's checkpoint under its new name.
    """
    last = Path(last)
    kept = free_name(last, "earlier-run", ".ckpt")
    try:
        os.link(last, kept)
    except OSError:
        shutil.copy2(last, kept)
    return kept


# ---- reading ------------------------------------------------------------------------------------------------------


def load_checkpoint(ckpt_path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any]:
    """Load an `oprd fit` checkpoint on the CPU (memory-mapped), with errors that say what is wrong.

    Raises:
        ValueError: a missing, empty, truncated or foreign file, named with the flag that gave it.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(
            f"{flag} {path} does not exist; `oprd fit` writes checkpoints to <trainer.default_root_dir>/checkpoints "
            "(`--ckpt_path last` picks the newest there)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for files that are not one
        size = path.stat().st_size
        objects = _pickled_objects(path) if size else []
        if objects:
            raise ValueError(
                f"{flag} {path} holds Python objects ({', '.join(objects[:3])}), which a checkpoint of this oprd never "
                "holds and a safe load refuses: it was written by an older oprd (which saved its settings as objects) "
                "or by another program. Resume it with the version that wrote it, or start a new run."
            ) from err
        what = f"is not a readable checkpoint ({size} bytes, {type(err).__name__})" if size else "is empty (0 bytes)"
        raise ValueError(
            f"{flag} {path} {what}: it may have been cut short or be another kind of file. Use a `last.ckpt` that "
            "`oprd fit` wrote."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{flag} {path} is not a checkpoint of `oprd fit` (no state_dict and hyper_parameters).")
    return checkpoint


def _pickled_objects(path: Path) -> list[str]:
    """The classes and functions a checkpoint file pickles beyond tensors and plain values ([] if it cannot tell)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all: the caller's "cut short or another kind of file" applies
        return []


# ---- shape check --------------------------------------------------------------------------------------------------


def check_state_shapes(
    module: torch.nn.Module,
    state_dict: Mapping[str, Any],
    source: str = "the checkpoint",
    optional: set[str] = frozenset(),
) -> None:
    """Refuse a state dict whose tensors do not fit `module`, naming every mismatch and its shapes.

    A checkpoint from a student of another width (or a teacher of another width, through the projectors, which are
    `[d_T, d_S]`) would otherwise fail deep inside `load_state_dict`, after the models were built.

    Args:
        optional: keys the state dict may lack (a LoRA student's frozen base weights, rebuilt from its model path).

    Raises:
        ValueError: e.g. `projectors.proj.1_3.weight is [64, 32] in the checkpoint but [64, 16] in this model`.
    """
    own = module.state_dict()
    keys = [k for k, v in state_dict.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    # Projectors first: their `[d_T, d_S]` names both widths at once.
    keys.sort(key=lambda k: "projectors." not in k)
    wrong = [f"{k} is {list(state_dict[k].shape)} in {source} but {list(own[k].shape)} in this model" for k in keys]
    extra, missing = sorted(set(state_dict) - set(own)), sorted(set(own) - set(state_dict) - set(optional))
    if extra or missing:
        named = [f"holds {len(extra)} tensors this model does not have (e.g. {extra[0]})"] if extra else []
        named += [f"lacks {len(missing)} of this model's tensors (e.g. {missing[0]})"] if missing else []
        raise ValueError(
            f"{source} {' and '.join(named)}: it was trained with another layer map, projector, model or "
            "hidden loss (`standardized_mse` and `layer_weights: learned` keep state). Use the model settings it was "
            "trained with (they are stored in it)."
        )
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ValueError(
            f"{source} does not fit this model: {'; '.join(wrong[:5])}{more}. It was saved from models of other "
            "widths or depths: use the model settings it was trained with (they are stored in the checkpoint)."
        )


def _log_resumed_steps_at_their_global_step(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written inside a step (the non-finite guard's) resume its logged step count at its global step.

    Lightning adds one to the saved logging-step count on resume, because it saves at the end of a step, before
    counting that step. A save inside a step comes after the count of the step before: without this, every step the
    resumed run logs would be one too high.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress, state = loop.get("epoch_loop.batch_progress"), loop.get("epoch_loop.state_dict")
    if progress and state and progress["total"]["started"] == progress["total"]["processed"] + 1:
        state["_batches_that_stepped"] -= 1


# ---- the callback -------------------------------------------------------------------------------------------------


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for runs that get stopped: RNG states, a save on SIGTERM / Ctrl-C, `last.ckpt` at the end.

    On SIGTERM (Lightning's handler) or a first Ctrl-C (ours), the current step finishes, `last.ckpt` is written and
    the run exits (code 143 for SIGTERM, 1 for Ctrl-C); a second Ctrl-C aborts at once without saving. Saving at a
    step boundary is what makes the resumed run identical: a checkpoint taken mid-step would mix two steps' states.
    `oprd fit` puts every run's checkpoints in `<trainer.default_root_dir>/checkpoints`, so `--ckpt_path last` finds
    the previous run's `last.ckpt`. A run that did not start from that file keeps it as `earlier-run-<time>.ckpt`
    when it first writes its own `last.ckpt` (not before: a run that fails before its first save leaves it in place).

    Args:
        dirpath: checkpoint folder (`oprd fit` default: `<trainer.default_root_dir>/checkpoints`).
        filename: name pattern of the top-k checkpoints.
        every_n_train_steps: also save every N optimizer steps (None: at validation and epoch ends only).
        save_last: keep `last.ckpt` at the newest saved step; signals and the end of training update it too.
        save_top_k: how many step- or metric-named checkpoints to keep besides `last.ckpt` (default 0: only
            `last.ckpt`, one write per save: a student checkpoint can be gigabytes).
        monitor: metric that ranks the top-k checkpoints (None: the newest are kept).
        mode: `min` or `max` for `monitor`.
        train_time_interval: also save at this wall-time interval.
        every_n_epochs: save every N epochs (None: Lightning's default).
        save_weights_only: drop optimizer, scheduler and loop states (such a checkpoint cannot resume exactly).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = None,
        save_last: bool | Literal["link"] | None = True,
        save_top_k: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            monitor=monitor,
            mode=mode,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_weights_only=save_weights_only,
        )
        self._ctrl_c = False
        self._stopping = False
        self._interrupt = False  # Ctrl-C's checkpoint is saved: stop at the next hook
        self._step_seen = 0
        self._saved_step: int | None = None  # the global step of the newest checkpoint this run wrote
        self._stepped = True  # whether the last batch ended an optimizer step (not mid gradient accumulation)
        self._sigint_installed = False
        self._previous_sigint: Any = None
        self._rng_to_restore: Mapping[str, Any] | None = None
        self._owns_last = False  # whether this run has written `last.ckpt` (after keeping an earlier run's aside)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._stopping = self._interrupt = self._owns_last = False
            self._install_ctrl_c()

    # -- RNG states: part of every checkpoint, restored just before the first resumed step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()
        self._saved_step = trainer.global_step
        _log_resumed_steps_at_their_global_step(checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen, self._stepped = trainer.global_step, True
        self._saved_step = trainer.global_step  # a resumed run's state is saved already
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # -- stopping on signals

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        if not self._stepped:
            return  # mid gradient accumulation: the accumulated gradients are not part of a checkpoint
        at_the_end = 0 <= trainer.max_steps <= trainer.global_step and not trainer.fast_dev_run
        if self.save_last and at_the_end and self._saved_step != trainer.global_step:
            # The final step is saved here, at the end of its step like any other, not at the end of training: by then
            # Lightning counts the epoch as finished, and a run extended to more steps would start the next epoch.
            self._save_last(trainer)
        signalled = self._ctrl_c or trainer.received_sigterm
        # Every rank must take part in a save (it is collective), so they agree on whether any rank was signalled.
        if not trainer.strategy.reduce_boolean_decision(signalled, all=False):
            return
        self._stopping = True
        self._save_current(trainer, "Ctrl-C" if self._ctrl_c else "SIGTERM")
        # SIGTERM: Lightning raises SIGTERMException once this step's hooks are done. Ctrl-C: our KeyboardInterrupt
        # (Lightning's handler tears the run down, exit code 1) waits for the next hook, since Lightning hands the
        # step's logged metrics to the loggers only after `on_train_batch_end`.
        self._interrupt = self._ctrl_c

    def _interrupt_if_stopping(self) -> None:
        if self._interrupt:
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._interrupt_if_stopping()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._interrupt_if_stopping()  # a user who pressed Ctrl-C does not wait for a validation run
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._interrupt_if_stopping()
        super().on_train_epoch_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_ctrl_c()
        if isinstance(exception, SIGTERMException) and not self._stopping:
            # SIGTERM came after this step's checkpoint hook (e.g. during validation): the step is complete, so its
            # state is consistent. With several ranks they may be at different points, and a save would hang.
            if trainer.world_size == 1 and not trainer.sanity_checking and trainer.global_step > 0:
                if not self._stepped:
                    rank_zero_warn("SIGTERM came mid gradient accumulation: the resumed step misses those gradients.")
                self._save_current(trainer, "SIGTERM")
        elif isinstance(exception, KeyboardInterrupt) and not self._stopping:
            rank_zero_warn(f"Aborted without saving; the newest checkpoint is {self.last_model_path or 'none'}.")
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer, pl_module) -> None:
        self._interrupt_if_stopping()
        # Lightning writes `last` at the end only if nothing was saved before: keep it at the final step instead.
        if self.save_last and not trainer.fast_dev_run and self._saved_step != trainer.global_step:
            self._save_last(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_ctrl_c()
        super().teardown(trainer, pl_module, stage)

    def _save_last(self, trainer) -> str:
        """Write `last.ckpt` (the `last` name pattern, filled in) through the Trainer, and remember it."""
        metrics = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        path = self.format_checkpoint_name(metrics, filename=self.CHECKPOINT_NAME_LAST)
        self._take_over_last(trainer, path)
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        self.last_model_path, self._saved_step = path, trainer.global_step  # no callback hook runs for weights only
        return path

    def _save_last_checkpoint(self, trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last:
            self._take_over_last(trainer, self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST))
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _take_over_last(self, trainer, path: str) -> None:
        """Before this run's first write of `path` (`last.ckpt`): keep a file there that another run wrote.

        The checkpoint this run resumed from is continued, not kept. Lightning would write `last-v1.ckpt` next to an
        earlier `last.ckpt` instead, and anyone validating `last.ckpt` would score the wrong run.
        """
        if self._owns_last:
            return
        self._owns_last = True
        self.last_model_path = path  # this run's from now on: Lightning neither versions nor removes it
        resumed = trainer.ckpt_path is not None and os.path.abspath(trainer.ckpt_path) == os.path.abspath(path)
        local = isinstance(get_filesystem(path), LocalFileSystem)
        if trainer.is_global_zero and local and not resumed and os.path.isfile(path):
            log.warning("An earlier run's last.ckpt is kept as %s; this run writes last.ckpt.", keep_aside(path))

    def _save_current(self, trainer, reason: str) -> None:
        # Without `last` (save_last false) nothing else would resume, so the signal writes `last.ckpt` anyway.
        path = self._save_last(trainer) if self._saved_step != trainer.global_step else self.last_model_path
        rank_zero_info(
            f"{reason}: saved a checkpoint at step {trainer.global_step} to {path}; resume "
            "with `oprd fit ... --ckpt_path last`."
        )

    def _install_ctrl_c(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return  # started with Ctrl-C ignored (nohup, background jobs): keep it so
        self._ctrl_c = False
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)
        self._sigint_installed = True

    def _on_ctrl_c(self, signum, frame) -> None:
        self._ctrl_c = True
        # The next Ctrl-C goes to the previous handler: KeyboardInterrupt at once, for a user who cannot wait.
        self._restore_ctrl_c()
        rank_zero_info("Ctrl-C: finishing this step, then saving a checkpoint. Press Ctrl-C again to abort at once.")

    def _restore_ctrl_c(self) -> None:
        if self._sigint_installed and threading.current_thread() is threading.main_thread():
            # None: the previous handler was not set from Python; the default one raises KeyboardInterrupt.
            previous = self._previous_sigint if self._previous_sigint is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._sigint_installed = False
