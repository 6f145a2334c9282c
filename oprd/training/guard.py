"""Numerical faults: find the term or parameter that went non-finite, name it, and stop or skip the step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

NonFinite = Literal["stop", "skip"]


def nonfinite_term(terms: Mapping[str, Tensor]) -> str | None:
    """The most specific loss term (`hidden/<pair>` before `hidden`) whose value is NaN or infinite, or None."""
    for name, value in sorted(terms.items(), key=lambda item: "/" not in item[0]):
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def nonfinite_grads(named_params: Iterable[tuple[str, nn.Parameter]], limit: int = 3) -> list[str]:
    """Names of (at most `limit`) parameters whose gradient holds NaN or infinity; a sharded (FSDP2) gradient is read
    on this rank's shard only, so the check starts no collective."""
    bad = []
    for name, param in named_params:
        if param.grad is not None and not torch.isfinite(_local(param.grad)).all():
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def describe_term(name: str) -> str:
    """`hidden/3_7` -> "the hidden-state term of layer pair 3_7 (student 3 -> teacher 7)"."""
    if name.startswith("hidden/"):
        pair = name.removeprefix("hidden/")
        student, _, teacher = pair.partition("_")
        return f"the hidden-state term of layer pair {pair} (student {student} -> teacher {teacher})"
    if name == "token":
        return "the token-space term"
    return f"the {name} term"


class NonFiniteError(FloatingPointError):
    """A run stopped on a non-finite loss or gradient. The message is for a user of `fit`; `step` and `what` are for a
    caller that records the run as diverged and goes on (`oprd compare`, where resuming does not apply).

    Args:
        message: what happened, what was saved and what to do.
        step: the optimizer step that failed.
        what: the term or parameter that is not finite.
    """

    def __init__(self, message: str, step: int | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.step, self.what = step, what


@dataclass(frozen=True)
class GuardConfig:
    """What a run does when a loss or gradient is NaN or infinite (`model.guard`; see `NonFiniteGuard`)."""

    nonfinite: NonFinite = "stop"
    """`stop` (saving the last good state first) or `skip` the step."""
    max_skips: int = 5
    """With `nonfinite: skip`, stop after this many skipped steps in a row."""
    keep_last_good: bool = True
    """Copy the trainable weights to CPU memory after each finite step, so that a stop saves the last weights that
    gave a finite loss."""

    def __post_init__(self) -> None:
        if self.max_skips < 1:
            raise ValueError(f"max_skips must be >= 1, got {self.max_skips}.")


class NonFiniteGuard(Callback):
    """What a run does when a loss or gradient is NaN or infinite: the training step asks it about the loss
    (`check_loss`); as a callback it checks the gradients before each optimizer step.

    A loss goes non-finite because the previous update broke the weights (a learning rate too high, say): by then the
    current weights are already bad. So after every step whose loss and gradients were finite, and before its update,
    the guard copies the trainable weights to CPU memory (`keep_last_good`: one copy per step, 4 bytes per trainable
    parameter in float32); a stop restores that copy before saving, so the saved checkpoint holds the last weights
    that gave a finite loss.

    Args:
        mode: `stop` (save the last good state, then raise) or `skip` the step (counted).
        max_skips: with `skip`, stop after this many steps in a row were skipped: the weights are broken then, and
            every later step would be skipped too.
        keep_last_good: keep the CPU copy described above; without it a stop saves the current weights.
    """

    def __init__(self, mode: NonFinite = "stop", max_skips: int = 5, keep_last_good: bool = True) -> None:
        self.mode, self.max_skips, self.keep_last_good = mode, max_skips, keep_last_good
        self.skipped = 0
        self.in_a_row = 0
        self._good: list[tuple[nn.Parameter, Tensor]] | None = None
        self._step_finite = True  # every micro-batch of this optimizer step had a finite loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.check_grads(trainer, pl_module.named_parameters(), optimizer):
            pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)

    def check_loss(self, trainer, terms: Mapping[str, Tensor]) -> bool:
        """A micro-batch's loss terms: True when one is non-finite on any rank (the caller drops the micro-batch)."""
        bad = nonfinite_term(terms)
        if not trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            return False
        self._step_finite = False
        self.failed(trainer, f"{describe_term(bad or 'loss')} is not finite", weights_broken=True)
        return True

    def check_grads(self, trainer, named_params: Iterable[tuple[str, nn.Parameter]], optimizer) -> bool:
        """The step's gradients, before the optimizer applies them: True when one is non-finite on any rank (the
        gradients are dropped); otherwise, after a step whose losses were all finite, keep its weights as good.

        """
        named_params = list(named_params)
        bad = nonfinite_grads(named_params)
        step_finite, self._step_finite = self._step_finite, True
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            what = f"the gradient of {', '.join(bad) or 'a parameter on another rank'} is not finite"
            self.failed(trainer, what, weights_broken=False)
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            return True
        if step_finite:  # Lightning calls the optimizer hooks for steps whose micro-batches were skipped too
            self.passed(param for _, param in named_params)
        return False

    def passed(self, params: Iterable[nn.Parameter]) -> None:
        """The step's loss and gradients were finite: its (not yet updated) weights are the last good ones."""
        self.in_a_row = 0
        if not self.keep_last_good:
            return
        if self._good is None:
            self._good = [(p, _local(p).detach().to("cpu", copy=True)) for p in params if p.requires_grad]
            return
        for param, copy in self._good:
            copy.copy_(_local(param).detach())

    def failed(self, trainer, what: str, weights_broken: bool) -> None:
        """Skip the step (returns; the caller drops it), or stop: restore the last good weights, save, raise.

        Args:
            what: the term or parameter that is not finite.
            weights_broken: the loss (not only a gradient) is non-finite, so the current weights are already bad.
        """
        if self.mode == "skip" and self.in_a_row + 1 < self.max_skips:
            self.in_a_row += 1
            self.skipped += 1
            return
        step = trainer.global_step
        why = f"Step {step}: {what}"
        if self.mode == "skip":
            why += (
                f"; {self.max_skips} steps in a row were not finite (model.guard.max_skips): the weights no longer "
                "give finite losses"
            )
        saved = "the last weights whose loss and gradients were finite"
        if weights_broken and self.keep_last_good:
            if self._good is None:
                raise NonFiniteError(
                    f"{why}. No step had a finite loss and gradient yet, so nothing was saved: check the models and "
                    "data, or lower the learning rate.",
                    step,
                    what,
                )
            with torch.no_grad():
                for param, copy in self._good:
                    _local(param).copy_(copy)
        elif weights_broken:
            saved = "the current weights (already changed by the update that broke the loss: keep_last_good is off)"
        path = Path(trainer.default_root_dir) / f"nonfinite-step{step}-last-good.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        raise NonFiniteError(
            f"{why}. Saved {saved} to {path}. Lower the learning rate (--model.optim.lr) and resume from it with "
            "--ckpt_path, or set `model.guard.nonfinite: skip` to skip such steps.",
            step,
            what,
        )


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
