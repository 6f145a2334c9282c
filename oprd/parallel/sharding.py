"""Multi-process training: what DDP and FSDP2 need from the student, the projectors and the teacher.

* **DDP** (`--trainer.strategy ddp`): every trainable parameter must get a gradient in every step, or DDP (with its
  default `find_unused_parameters=False`) fails at the second step. The hidden-state loss never reaches the LM head
  (and, with a truncating layer map, the final norm or the last layers), so `freeze_unreached` freezes what the loss
  cannot reach. Their updates were zero anyway; frozen, they cost no gradient buffers or all-reduce traffic.
* **FSDP2** (`--trainer.strategy fsdp2`, i.e. `FSDP2Strategy`): Lightning's `ModelParallelStrategy` with every
  process in one data-parallel group and single-file checkpoints. `configure_sharding` (called from
  `DistillModule.configure_model`) shards each decoder layer and then the whole student (`shard_model`), and the
  projectors; with `teacher_placement.shard: true` the
  teacher too (under DDP as well: a DDP student with an FSDP2 teacher). Sharded models run whole forward passes
  (`oprd.models.capture.full_forward_states`): hook-based early exit would skip FSDP's post-forward hooks.
  Generation passes `synced_gpus=True` (a rank that stops sampling early would otherwise leave the others waiting in
  an all-gather).

Global normalisation is the same for both: DDP and FSDP2 average gradients over ranks and Lightning divides by the
accumulation count, so `DistillModule.on_before_optimizer_step` multiplies both back and divides by the all-reduced
response-token count of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.constants import default_pg_timeout

from oprd.losses.lm_head import Head
from oprd.models.capture import NORM, Point, is_sharded
from oprd.models.layers import find_final_norm, find_layers


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes: `ModelParallelStrategy` with data parallelism over every device, no tensor
    parallelism, and (by default) checkpoints gathered into one file that a single-process run or `oprd export` loads.

    Args:
        save_distributed_checkpoint: save one shard per rank (a folder) instead of one gathered file; for models
            whose full state does not fit rank 0's CPU memory. Consolidate it with
            `python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>`.
        process_group_backend: `nccl` on GPUs, `gloo` on CPUs by default.
        timeout: collective-operation timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # The parent's "auto" is the node count, and the world size is known only now. No public setter exists:
        # `tests/test_lightning_api.py` fails if this member goes, and pyproject pins the Lightning range.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def register_strategies() -> None:
    """Make `--trainer.strategy fsdp2` name `FSDP2Strategy` (the CLI calls this before parsing)."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over all processes (oprd.parallel)")


def data_parallel_mesh(strategy, device: torch.device):
    """The mesh to shard over: the strategy's data-parallel mesh, or every process (e.g. under DDP)."""
    if isinstance(strategy, ModelParallelStrategy):
        if strategy.device_mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "oprd shards with FSDP2 only (no tensor parallelism): use `--trainer.strategy fsdp2`, or set "
                "ModelParallelStrategy's `data_parallel_size` to the number of processes and `tensor_parallel_size: 1`."
            )
        return strategy.device_mesh["data_parallel"]
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (strategy.world_size,), mesh_dim_names=("data_parallel",))


def shard_model(model: nn.Module, mesh, layers_path: str | None = None, reshard_root: bool = True) -> nn.Module:
    """FSDP2 in place: one unit per decoder layer (gathered one at a time), then the root (embeddings, norm, head).

    Args:
        reshard_root: free the root's gathered weights after each forward; False keeps them until the backward, as
            a token-space term needs (it reads the LM head's weight outside the forward).
    """
    from torch.distributed.fsdp import fully_shard

    for layer in find_layers(model, layers_path):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root)
    return model


def configure_sharding(
    strategy,
    student: nn.Module,
    projectors: nn.Module,
    teacher: nn.Module,
    layers_paths: dict,
    shard_teacher: bool,
    keep_head: bool,
) -> None:
    """Shard the student and projectors under `fsdp2` (ModelParallelStrategy), and the teacher on request.

    Args:
        layers_paths: `{"student": ..., "teacher": ...}` dotted paths to the decoder layers (None: found).
        shard_teacher: shard the teacher too (2+ processes, under `fsdp2` or `ddp`).
        keep_head: a token-space term reads the LM head outside the forward: keep the root gathered until the
            backward.
    """
    sharded = isinstance(strategy, ModelParallelStrategy)
    if shard_teacher and strategy.world_size == 1:
        rank_zero_warn("`teacher_placement.shard` needs 2+ processes; the teacher stays whole.")
    if is_sharded(student) or not (sharded or (shard_teacher and strategy.world_size > 1)):
        return
    mesh = data_parallel_mesh(strategy, strategy.root_device)
    if sharded:
        shard_model(student, mesh, layers_paths["student"], reshard_root=not keep_head)
        if any(True for _ in projectors.parameters()):
            from torch.distributed.fsdp import fully_shard

            fully_shard(projectors, mesh=mesh)
    if shard_teacher and not is_sharded(teacher):
        shard_model(teacher.to(strategy.root_device), mesh, layers_paths["teacher"])


def synced_generation(trainer, model: nn.Module) -> bool:
    """Whether `generate` must keep the ranks in lock-step (`synced_gpus=True`).

    Sharded models all-gather inside their forward, so a rank that stops sampling early would leave the others waiting.
    DDP needs no sync (its collectives run in the backward); other multi-process strategies (DeepSpeed) may.
    """
    if trainer is None or trainer.world_size == 1:
        return False
    return is_sharded(model) or not isinstance(trainer.strategy, (DDPStrategy, ModelParallelStrategy))


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2-sharded parameter (a DTensor outside the forward) gathered whole, or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gathered_head(module: nn.Module) -> Head:
    """An output head module's `Head`, its FSDP2-sharded weight gathered whole for the token loss, which multiplies
    by the head's weight directly."""
    head = Head.of(module)
    if not hasattr(head.weight, "full_tensor"):
        return head
    return Head(gathered(head.weight), None if head.bias is None else gathered(head.bias))


def freeze_unreached(
    model: nn.Module, points: Sequence[Point], layers_path: str | None = None, needs_head: bool = False
) -> list[str]:
    """Freeze the parameters the loss cannot reach; returns their names.

    Reached: everything up to the deepest capture point. Unreached: decoder layers after it, the final norm unless
    `"norm"` is a capture point, and the output head unless a token-space term uses it; a weight tied to a reached
    module (tied embeddings) stays trainable.
    """
    layers = find_layers(model, layers_path)
    resolved = [p if p == NORM else int(p) % len(layers) for p in points]
    deepest = len(layers) - 1 if NORM in resolved else max((p for p in resolved if p != NORM), default=-1)
    unreached: list[nn.Module] = list(layers[deepest + 1 :])
    if NORM not in resolved:
        try:
            unreached.append(find_final_norm(model))
        except ValueError:
            pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not needs_head:
        unreached.append(head)
    inside = {id(m) for module in unreached for m in module.modules()}
    reached = {id(p) for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False)}
    frozen = []
    for name, param in model.named_parameters():
        if id(param) not in reached and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
