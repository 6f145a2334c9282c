"""DistillModule: on-policy representation distillation as a LightningModule (the Lightning hooks only).

The work is the `oprd.distiller.Distiller`'s (responses, states, objective, calibration); held-out scoring is
`oprd.evaluation`'s; sharding and teacher placement, `oprd.parallel`'s; optimizer, faults and throughput,
`oprd.training`'s. training_step: the Distiller's responses and terms -> fault check -> log.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch import Tensor

from oprd.distiller import Distiller, EvalConfig, TeacherConfig
from oprd.evaluation.scoring import ANSWERED, score_by_teacher, weighted_scores
from oprd.hparams import to_plain, typed_model_args
from oprd.models.lora import frozen_base_keys
from oprd.models.spec import ModelSpec
from oprd.objective.objective import ObjectiveConfig
from oprd.parallel.placement import TeacherPlacement
from oprd.parallel.remote import saved_if_teacher_lost
from oprd.parallel.sharding import synced_generation
from oprd.rollout.sampling import RolloutConfig, rollout_seed
from oprd.training.checkpoint import check_state_shapes
from oprd.training.guard import GuardConfig, NonFiniteGuard
from oprd.training.optim import OptimConfig, build_optimizer, retune_saved_optimizer, scale_gradients
from oprd.training.throughput import StepMeter
from oprd.training.weight_sync import WeightSync


class DistillModule(L.LightningModule):
    """Distil a student into a frozen teacher's hidden states on the student's own samples.

    Args:
        teacher: the frozen teacher model.
        student: the student model (trained).
        tokenizer: tokenizer id/folder/alias, or `tiny`; default: the student's, else the teacher's.
        objective: what the student is trained against: layer map, projectors, hidden and token terms.
        rollout: how the student samples during training (and the on-policy fraction).
        optim: optimizer and schedule.
        eval: held-out scoring in validate/test and the report.
        guard: what a NaN/inf loss or gradient does.
        teacher_placement: where the teacher runs (another device, offloaded, sharded, or on Ray replicas).
        teachers: more teachers by name, each prompt learning from the one its `teacher` column names (empty:
            `teacher`); each has its own layer map, projectors and placement, and `train/<name>/...` metrics.
        max_prompt_length: longest prompt in tokens.
        truncate_prompts: cut longer prompts (with a warning) instead of refusing them.
        seed: base seed of the rollouts (each step's seed derives from it, so resumed runs sample the same).
    """

    def __init__(
        self,
        teacher: ModelSpec,
        student: ModelSpec,
        tokenizer: str | None = None,
        objective: ObjectiveConfig = ObjectiveConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        eval: EvalConfig = EvalConfig(),
        guard: GuardConfig = GuardConfig(),
        teacher_placement: TeacherPlacement = TeacherPlacement(),
        teachers: dict[str, TeacherConfig] | None = None,
        max_prompt_length: int = 512,
        truncate_prompts: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        args = typed_model_args(self.hparams)  # every setting checked before anything loads
        for key, value in self.hparams.items():
            self.hparams[key] = to_plain(value)
        self.optim_cfg, self.placement = args["optim"], args["teacher_placement"]
        self.distiller = Distiller.build(
            args["teacher"],
            args["student"],
            args["objective"],
            args["rollout"],
            args["eval"],
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
            truncate_prompts=truncate_prompts,
            placement=self.placement,
            seed=seed,
            teachers=args["teachers"],
        )
        if self.distiller.student_spec is not args["student"]:  # layers chosen by importance go into every checkpoint
            self.hparams["student"] = to_plain(self.distiller.student_spec)
        self.pair, self.student, self.objective = self.distiller.pair, self.distiller.student, self.distiller.objective
        if self.distiller.others:  # each teacher's projectors, checkpointed as `teacher_objectives.<name>.*`
            others = self.distiller.others.items()
            self.teacher_objectives = torch.nn.ModuleDict({name: other.objective for name, other in others})
        guard = args["guard"]
        self.guard = NonFiniteGuard(guard.nonfinite, guard.max_skips, guard.keep_last_good)
        self.meter, self.weight_sync = StepMeter(), WeightSync(self.pair)
        self._step_tokens = torch.zeros(())

    def configure_callbacks(self) -> list[L.Callback]:
        # The gradient check before each optimizer step, the step's throughput, the rollout engine's weight copy.
        return [self.guard, self.meter, self.weight_sync]

    # ---- the step -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor | None:
        seed = rollout_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)
        with saved_if_teacher_lost(self.trainer):
            roll, on_policy, lmbda = self.distiller.step_responses(batch, self.global_step, seed)
            self.meter.rollout_done(int(roll.response_mask.sum()), int(roll.attention_mask.sum()))
            terms = self.distiller.distill_routed(roll, batch.get("teacher"), self.global_step)
        if self.guard.check_loss(self.trainer, terms.named()):
            self.log("train/skipped_steps", float(self.guard.skipped), batch_size=1)
            return None  # skips this micro-batch
        tokens = terms.tokens  # what the sums are over: response tokens, or those a hidden term alone selects
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens
        metrics = {f"train/{name}": value for name, value in terms.metrics().items()}
        metrics["train/response_length"] = roll.response_lengths.float().mean()
        if self.distiller.rollout.mixes:
            metrics["train/on_policy"], metrics["train/lmbda"] = float(on_policy), lmbda
        self.log_dict(metrics, batch_size=len(roll.input_ids))
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=len(roll.input_ids))
        # A sum over tokens: `on_before_optimizer_step` divides by the whole step's token count.
        return terms.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Exact global normalisation: micro-batches returned sums; Lightning divided them by the accumulation
        # count and DDP averaged over ranks, so multiply both back and divide by the step's total token count.
        total = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        scale_gradients(optimizer, self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp_min(1))
        self._step_tokens = torch.zeros((), device=self._step_tokens.device)

    # ---- around the step ------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        # After a checkpoint is restored (a resumed run's Bridge is calibrated already), before the first step.
        self.calibrate()

    def calibrate(self) -> dict[str, float]:
        """Calibrate the projectors (Bridge, select) on the training prompts if they are not calibrated yet (every
        rank: the rollouts may be in lock-step), and log their metrics; empty when there was nothing to do.

        The module calls it before the first step; a callback that scores the student before training calls it
        first, so that what it scores is what trains (an uncalibrated Bridge scores cosine 0).
        """
        if not self.distiller.needs_calibration:
            return {}
        data = self.trainer.datamodule
        prompts, teachers = [x["prompt"] for x in data.train_items], [x.get("teacher") for x in data.train_items]
        metrics = self.distiller.calibrate(prompts, data.hparams.batch_size, teachers)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        return metrics

    # ---- evaluation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self, batch: dict[str, list], prefix: str) -> None:
        """Score a held-out batch, each prompt by its own teacher, and log `<prefix>/<metric>` (and with several
        teachers `<prefix>/<teacher>/<metric>`): each metric's epoch value is weighted by the prompts it covers
        (accuracy by the answered ones), `answered` is their total."""
        distiller = self.distiller
        groups, _ = score_by_teacher(
            distiller, batch["prompt"], batch["answer"], batch.get("teacher"), distiller.evaluation.model
        )
        for name, (value, count) in weighted_scores(groups, several=bool(distiller.others)).items():
            reduce_fx = "sum" if name.endswith(ANSWERED) else "mean"
            self.log(f"{prefix}/{name}", value, sync_dist=True, batch_size=count, reduce_fx=reduce_fx)

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        greedy = self.distiller.rollout.greedy(self.distiller.evaluation.max_new_tokens)
        texts = self.pair.decode(self.distiller.sample(batch["prompt"], greedy))
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], texts, strict=True)]

    # ---- plumbing -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.distiller.rest_teachers(self.device)
        self.distiller.lockstep = functools.partial(synced_generation, _attached_trainer(self))

    def configure_model(self) -> None:
        trainer = _attached_trainer(self)  # `load_from_checkpoint` calls this hook too: one process shards nothing
        if trainer is not None:
            self.distiller.shard(trainer.strategy, self.placement.shard)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.pair.engine.on_save_checkpoint(self.student)  # a run resumed from here starts its engine on these weights
        # A LoRA student's frozen base weights come back from its model path: only adapters and projectors are saved.
        for name in frozen_base_keys(self.student, "student."):
            checkpoint["state_dict"].pop(name, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A LoRA student's frozen base weights are the ones just loaded from its model path: the state is whole again.
        state, own = checkpoint["state_dict"], self.state_dict()
        for name in frozen_base_keys(self.student, "student."):
            state.setdefault(name, own[name])
        # A checkpoint of another student/teacher width fails here, naming the shapes, not deep in load_state_dict.
        check_state_shapes(self, state)
        retune_saved_optimizer(self.optim_cfg, checkpoint)  # a resumed run takes the learning rate it is given

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.optim_cfg.schedule == "cosine" else 1
        projectors = (param for each in self.distiller.per_teacher for param in each.objective.parameters())
        return build_optimizer(self.optim_cfg, self.student.parameters(), projectors, total)


def _attached_trainer(module: L.LightningModule):
    """The module's Trainer, or None outside a fit/validate/... (the public property raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None
