"""Where the frozen teacher lives: on the student's device, on another device, or in CPU RAM between passes.

The teacher's dtype is `model.teacher.dtype` (`bfloat16` / `float16` halve its memory; hidden states are compared in
float32 whatever the dtype). Its placement is one of:

=========================  ======================================================================================
`model.teacher_placement`  teacher memory on the student's device (P teacher parameters, B bytes per parameter)
=========================  ======================================================================================
default                    P x B for the whole run.
`device: cuda:1`           none: the teacher runs on its own device; each step moves the sequences there and the
                           captured states (`[b, t, d_T]` per mapped layer) back. A token-space term also copies
                           the teacher's LM head (`V x d_T x B`) to the student's device once.
`offload: true`            none between passes; P x B while the teacher pass runs (its weights are copied in, then
                           dropped), so the teacher never coexists with the student's activations and gradients,
                           which peak in the student pass. Costs one host-to-device copy of P x B per step (and
                           its LM head again when a token-space term needs it).
`shard: true`              P x B / world size at rest, plus one decoder layer gathered at a time during its pass
                           (FSDP2, see `oprd.parallel.sharding`); needs 2+ processes.
`remote: {...}`            none in the trainer's process: replicas on Ray actors (`oprd.parallel.remote`) send the
                           states back; a token-space term keeps only the teacher's LM head (`V x d_T x B`).
=========================  ======================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from oprd.losses.lm_head import Head
from oprd.models.capture import Point, hidden_states, is_sharded
from oprd.parallel.remote import RemoteTeacherConfig
from oprd.parallel.sharding import gathered, gathered_head
from oprd.rollout.engine import HFGenerateEngine
from oprd.rollout.sampling import Rollout, RolloutConfig


@dataclass(frozen=True)
class TeacherPlacement:
    """Where the teacher runs (`model.teacher_placement`): a fixed device, CPU offload between passes, sharded over
    all processes, or replicas on a Ray cluster (one of them). The memory cost of each: this module's docstring."""

    device: str | None = None
    """Device of the teacher (`cuda:1`, `cpu`); None: the student's device."""
    offload: bool = False
    """Keep the teacher in CPU memory and move it to the compute device only for its pass."""
    shard: bool = False
    """Shard the teacher with FSDP2 across all processes (`oprd.parallel.sharding.configure_sharding` does it)."""
    remote: RemoteTeacherConfig | None = None
    """Run the teacher as replicas on Ray actors instead of in the trainer's process."""

    def __post_init__(self) -> None:
        if self.remote is not None and (self.device is not None or self.offload or self.shard):
            raise ValueError("remote runs the teacher outside the trainer: drop device, offload and shard.")
        if self.shard and (self.device is not None or self.offload):
            raise ValueError("shard spreads the teacher over all devices: drop device and offload.")
        if self.device is not None and self.offload:
            raise ValueError(
                "device and offload exclude each other (offloading moves the teacher to the student's device for "
                "each pass): give one."
            )
        if self.device is not None:
            torch.device(self.device)  # a malformed device string fails at start-up, not at the first step

    def compute_device(self, student_device: torch.device) -> torch.device:
        """Where the teacher's pass runs."""
        return torch.device(self.device) if self.device is not None else student_device

    def rest_device(self, student_device: torch.device) -> torch.device:
        """Where the teacher waits between passes."""
        return torch.device("cpu") if self.offload else self.compute_device(student_device)

    def rest(self, teacher: nn.Module, student_device: torch.device) -> None:
        """Move the teacher to where it waits between passes (a no-op once it is there)."""
        _move(teacher, self.rest_device(student_device))

    @contextlib.contextmanager
    def active(self, teacher: nn.Module, student_device: torch.device) -> Iterator[torch.device]:
        """The teacher on its compute device for the duration of the block; yields that device."""
        device = self.compute_device(student_device)
        _move(teacher, device)
        try:
            yield device
        finally:
            if self.offload:
                _move(teacher, torch.device("cpu"))

    def head(self, teacher: nn.Module, student_device: torch.device) -> Head:
        """The teacher's output head on the student's device.

        A head elsewhere (another device, CPU offload) is copied for this step; an FSDP-sharded head is gathered.
        """
        return gathered_head(teacher.get_output_embeddings()).to(student_device)


def _move(module: nn.Module, device: torch.device) -> None:
    param = next(module.parameters(), None)
    if param is not None and param.device != device:
        module.to(device)


class FrozenTeacher:
    """The frozen teacher and where it lives, held outside the LightningModule's submodules.

    A plain object, not an `nn.Module`: the teacher stays out of the optimizer, the checkpoint and the model summary,
    and Lightning does not move it (`rest` places it where it waits between passes).

    Args:
        model: the teacher, frozen and in eval mode.
        placement: its device or CPU offload.
    """

    def __init__(self, model: nn.Module, placement: TeacherPlacement) -> None:
        self.model, self.placement = model.eval().requires_grad_(False), placement

    def rest(self, student_device: torch.device) -> None:
        """Move the teacher to where it waits between passes (a sharded teacher stays where FSDP put it)."""
        if not is_sharded(self.model):
            self.placement.rest(self.model, student_device)

    def active(self, student_device: torch.device):
        """Context: the teacher on its compute device; yields that device."""
        return self.placement.active(self.model, student_device)

    def head(self, student_device: torch.device):
        """The teacher's output head on the student's device (see `TeacherPlacement.head`)."""
        return self.placement.head(self.model, student_device)

    def input_embedding(self) -> torch.Tensor:
        """The teacher's input embedding weight `[v, d]`, whole (gathered when sharded), where it lives."""
        return gathered(self.model.get_input_embeddings().weight)

    @torch.no_grad()
    def states(
        self, roll: Rollout, points: Sequence[Point], layers_path: str | None, student_device: torch.device
    ) -> dict[Point, torch.Tensor]:
        """The teacher's states `[b, t, d]` at `points`, on the student's device; its pass stops after the deepest."""
        with self.active(student_device) as device:
            on_device = roll.to(device)
            states = hidden_states(self.model, points, layers_path, on_device.input_ids, on_device.attention_mask)
        return {point: state.to(student_device) for point, state in states.items()}

    def generate(
        self,
        tokenizer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: RolloutConfig,
        seed: int | None,
        student_device: torch.device,
        synced: bool = False,
    ) -> Rollout:
        """The teacher's own responses to formatted prompts `[b, p]`, on the student's device."""
        with self.active(student_device) as device:
            ids, mask = input_ids.to(device), attention_mask.to(device)
            roll = HFGenerateEngine().generate(self.model, tokenizer, ids, mask, config, seed=seed, synced_gpus=synced)
        return roll.to(student_device)
