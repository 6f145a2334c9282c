"""A training run on fixed rollouts, for the multi-process tests in tests/parallel/test_distributed.py.

    python -m tests.parallel.distributed_worker --out DIR --rollout FILE [--strategy ddp|fsdp2] [--devices 2] ...

Lightning's `ddp` / `fsdp2` strategies start the other ranks by re-running this command. Every rank replays its
slice of the rollouts in FILE (`{"steps": [Rollout, ...]}`, one rollout per optimizer step): micro-batch `m` of rank
`r` gets chunk `m * world + r`, so the ranks and micro-batches of a step together hold exactly that step's rollout,
whatever the layout. Rank 0 writes `grads.pt` (the gradients the optimizer saw at each step, gathered when sharded)
and `weights.pt` (the final student and projector weights); every rank takes part in `final.ckpt`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from oprd.data import PromptDataModule
from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.models import ModelSpec
from oprd.module import DistillModule
from oprd.parallel.sharding import FSDP2Strategy, is_sharded
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig
from tests.helpers import STUDENT, TEACHER


def specs(dtype: str = "float32", **kwargs) -> dict:
    """The tiny pair's DistillModule arguments, both models in `dtype`."""
    defaults = dict(
        teacher=ModelSpec(config=TEACHER, seed=1, dtype=dtype),
        student=ModelSpec(config=STUDENT, seed=2, dtype=dtype),
        tokenizer="tiny",
        rollout=RolloutConfig(max_new_tokens=10),
        optim=OptimConfig(lr=1e-3, projector_lr=1e-2, schedule="constant"),
        max_prompt_length=64,
    )
    return {**defaults, **kwargs}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (FSDP2 keeps DTensor shards: gathering them is a collective on every rank)."""
    gather = getattr(tensor, "full_tensor", None)
    return (gather() if gather is not None else tensor).detach().cpu().clone()


class ReplayRollouts(DistillModule):
    """Replays this rank's chunks of fixed rollouts and records the gradients the optimizer sees."""

    steps: list = []  # set before building: one Rollout per optimizer step

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls, self.grads = 0, []
        self.sampled, self.distiller.sample = self.distiller.sample, self.sample

    def sample(self, prompts, config, seed=None, model=None):
        if model is not None or not self.training:
            return self.sampled(prompts, config, seed, model)
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        step, micro = divmod(self.calls, accumulate)
        self.calls += 1
        roll = self.steps[step]
        size = roll.input_ids.shape[0] // (world * accumulate)
        i = (micro * world + self.global_rank) * size
        return replace(
            roll,
            input_ids=roll.input_ids[i : i + size].to(self.device),
            attention_mask=roll.attention_mask[i : i + size].to(self.device),
            response_mask=roll.response_mask[i : i + size].to(self.device),
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.grads.append({n: full(p.grad) for n, p in self.named_parameters() if p.grad is not None})


def train(
    out: Path,
    rollout: Path,
    strategy: str = "auto",
    devices: int = 1,
    accumulate: int = 1,
    shard_teacher: bool = False,
    token_loss: bool = False,
    hidden_kind: str = "mse",
    dtype: str = "float64",
) -> None:
    """Train on the replayed rollouts (one optimizer step per rollout in the file) and write the results to `out`.

    The models, projectors and losses run in `dtype`: float64 by default, because the tests compare two orders of the
    same computation, which float32 round-off (amplified by Adam's first, sign-like steps) would decide instead.
    """
    ReplayRollouts.steps = torch.load(rollout, weights_only=False)["steps"]
    rows = ReplayRollouts.steps[0].input_ids.shape[0]
    token = {"token_loss": TokenLossConfig(objective="reverse_kl", estimator="exact")} if token_loss else {}
    hidden = HiddenLossConfig(kind=hidden_kind)
    placement = {"shard": shard_teacher}
    module = ReplayRollouts(**specs(dtype, teacher_placement=placement, objective={"hidden_loss": hidden, **token}))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FSDP2Strategy() if strategy == "fsdp2" else strategy,
        max_steps=len(ReplayRollouts.steps),
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, PromptDataModule(batch_size=max(rows // (devices * accumulate), 1)))
    # Elements of the student this rank holds: all of them unless FSDP2 sharded it.
    local = sum(getattr(p, "_local_tensor", p).numel() for p in module.student.parameters())
    sharded = {"student": is_sharded(module.student), "teacher": is_sharded(module.pair.teacher), "local_numel": local}
    weights = {k: full(v) for k, v in module.state_dict().items()}
    trainer.save_checkpoint(Path(out) / "final.ckpt")
    if trainer.global_rank == 0:
        torch.save({"grads": module.grads, "weights": weights, "sharded": sharded}, Path(out) / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rollout", required=True)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--shard-teacher", action="store_true")
    parser.add_argument("--token-loss", action="store_true")
    parser.add_argument("--hidden-kind", default="mse")
    parser.add_argument("--dtype", default="float64")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a two-core machine
    train(
        Path(args.out),
        Path(args.rollout),
        args.strategy,
        args.devices,
        args.accumulate,
        shard_teacher=args.shard_teacher,
        token_loss=args.token_loss,
        hidden_kind=args.hidden_kind,
        dtype=args.dtype,
    )


if __name__ == "__main__":
    main()
