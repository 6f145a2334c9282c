"""DistillModule: on-policy representation distillation as a LightningModule (the Lightning hooks only).

Shape legend:
    b  sequences in the micro-batch (prompts x generations)
    t  prompt + response tokens
    d  hidden width

training_step: rollout -> teacher states -> student states -> objective -> log. What is learned besides the student
and how the terms mix is `oprd.objective`; where the teacher lives, `oprd.parallel`; held-out scoring,
`oprd.evaluation`; optimizer, faults and throughput, `oprd.training`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor

from oprd.data import format_prompts
from oprd.evaluation.scoring import Responder, score
from oprd.hparams import to_plain, typed_model_args
from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.models.capture import NORM, Point
from oprd.models.layers import check_layer_count
from oprd.models.lora import frozen_base_keys, is_lora
from oprd.models.spec import ModelSpec, load_config, load_model, pruned_from
from oprd.models.tokenizers import check_positions, check_vocab, pair_tokenizer
from oprd.objective.bridge import BridgeConfig
from oprd.objective.calibration import calibrate_bridge
from oprd.objective.layer_map import LayerMapSpec, resolve_layer_map
from oprd.objective.objective import Heads, LossTerms, Objective, Projector
from oprd.parallel.placement import FrozenTeacher, TeacherPlacement
from oprd.parallel.sharding import (
    configure_sharding,
    freeze_unreached,
    gathered_head,
    hidden_states,
    local_grads,
    synced_generation,
)
from oprd.rollout.engine import HFGenerateEngine, get_engine
from oprd.rollout.mixing import step_responses
from oprd.rollout.sampling import Rollout, RolloutConfig, rollout_seed
from oprd.training.checkpoint import check_state_shapes
from oprd.training.guard import NonFinite, NonFiniteGuard, describe_term, nonfinite_grads, nonfinite_term
from oprd.training.optim import OptimConfig, build_optimizer, retune_saved_optimizer, scale_gradients
from oprd.training.throughput import StepMeter


class DistillModule(L.LightningModule):
    """Distil a student into a frozen teacher's hidden states on the student's own samples.

    Args:
        teacher: the frozen teacher model.
        student: the student model (trained).
        tokenizer: tokenizer id/folder/alias, or `tiny`; default: the student's, else the teacher's.
        layer_map: `uniform`, `all`, `last`, `norm`, `pruned`, or explicit `[[student, teacher], ...]` pairs.
        projector: how student states meet teacher states: `linear` (a trained `Linear(d_S, d_T)` per pair, identity
            for equal widths) or `bridge` (OPRD-Bridge: a frozen rank-r PCA subspace of the teacher's states and a
            student projector calibrated into it before training; for pairs of different widths).
        bridge: the Bridge's rank and calibration (with `projector: bridge`).
        hidden_loss: how hidden states are compared.
        hidden_weight: mu, the weight of the hidden-state term (0 turns it off: pure token-space distillation).
        token_loss: the token-space (logit) term on the same rollout and teacher pass; None turns it off.
        token_weight: the weight of the token-space term.
        balance: rescale the hidden term to the token term's magnitude (a detached ratio) before weighting.
        rollout: how the student samples during training.
        optim: optimizer and schedule.
        max_prompt_length: longest prompt in tokens.
        truncate_prompts: cut longer prompts (with a warning) instead of refusing them.
        val_max_new_tokens: response length during evaluation (greedy); default `rollout.max_new_tokens`.
        eval_model: which model answers the held-out prompts in validate/test: the `student` or the `teacher`
            (to score the teacher with the same metrics).
        eval_samples: k > 0 adds sampled accuracy to held-out scoring: `accuracy_avg@k` (mean over k samples per
            prompt) and `accuracy_best@k` (a correct one among them), at `eval_temperature` and `eval_top_p`.
        eval_temperature: sampling temperature of `eval_samples` (the OPRD paper: 0.7).
        eval_top_p: nucleus threshold of `eval_samples` (the OPRD paper: 0.95).
        nonfinite: on a NaN/inf loss or gradient, `stop` (saving the last good state first) or `skip` the step.
        nonfinite_max_skips: with `nonfinite: skip`, stop after this many skipped steps in a row.
        keep_last_good: copy the trainable weights to CPU memory after each finite step (one copy per step), so that
            a stop saves the last weights that gave a finite loss, not the ones the bad update already broke.
        seed: base seed of the rollouts (each step's seed derives from it, so resumed runs sample the same).
        teacher_device: run the teacher on this device (`cuda:1`, `cpu`) instead of the student's: no teacher weights
            on the student's device; each step moves the sequences over and the captured states back.
        offload_teacher: keep the teacher in CPU memory between passes and move it to the device for its pass only:
            its P x bytes leave the device before the student's forward/backward peak; costs one host-to-device copy
            of the teacher per step (see `oprd.parallel.placement` for every option's memory cost).
        shard_teacher: shard the teacher with FSDP2 across all processes (under `fsdp2` or `ddp`): P x bytes / world
            size per device, one layer gathered at a time during its pass.
    """

    def __init__(
        self,
        teacher: ModelSpec,
        student: ModelSpec,
        tokenizer: str | None = None,
        layer_map: LayerMapSpec = "uniform",
        projector: Projector = "linear",
        bridge: BridgeConfig = BridgeConfig(),
        hidden_loss: HiddenLossConfig = HiddenLossConfig(),
        hidden_weight: float = 1.0,
        token_loss: TokenLossConfig | None = None,
        token_weight: float = 1.0,
        balance: bool = False,
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        max_prompt_length: int = 512,
        truncate_prompts: bool = True,
        val_max_new_tokens: int | None = None,
        eval_model: Responder = "student",
        eval_samples: int = 0,
        eval_temperature: float = 0.7,
        eval_top_p: float = 0.95,
        nonfinite: NonFinite = "stop",
        nonfinite_max_skips: int = 5,
        keep_last_good: bool = True,
        seed: int = 0,
        teacher_device: str | None = None,
        offload_teacher: bool = False,
        shard_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        args = typed_model_args(self.hparams)  # every setting checked before anything loads
        for key, value in self.hparams.items():
            self.hparams[key] = to_plain(value)
        teacher, student, token_loss = args["teacher"], args["student"], args["token_loss"]
        self.rollout_cfg, self.optim_cfg = args["rollout"], args["optim"]
        placement = TeacherPlacement(teacher_device, offload_teacher)
        if shard_teacher and (teacher_device is not None or offload_teacher):
            raise ValueError(
                "`shard_teacher` spreads the teacher over all devices: drop teacher_device/offload_teacher."
            )
        self.engine = get_engine(self.rollout_cfg.engine)
        self.layers_paths = {"teacher": teacher.layers_path, "student": student.layers_path}
        self.tokenizer = pair_tokenizer(tokenizer, teacher, student)
        # Configs first: a bad layer map or vocabulary fails before any weights load.
        t_cfg, s_cfg = load_config(teacher, len(self.tokenizer)), load_config(student, len(self.tokenizer))
        check_vocab(self.tokenizer, t_cfg, "teacher")
        check_vocab(self.tokenizer, s_cfg, "student")
        check_positions(max_prompt_length, max(self.rollout_cfg.max_new_tokens, val_max_new_tokens or 0), t_cfg, s_cfg)
        kept = pruned_from(student, len(self.tokenizer))
        pairs = resolve_layer_map(layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept)
        self.objective = Objective(
            pairs,
            s_cfg,
            t_cfg,
            len(self.tokenizer),
            args["hidden_loss"],
            hidden_weight,
            token_loss,
            token_weight,
            balance,
            seed,
            projector,
            args["bridge"],
        )
        self.student = load_model(student, s_cfg, self.tokenizer).train()  # from_pretrained returns eval mode
        teacher_model = load_model(teacher, t_cfg, self.tokenizer)
        self.frozen_teacher = FrozenTeacher(teacher_model, placement)
        for who, model in (("student", self.student), ("teacher", self.teacher)):
            check_layer_count(model, self.layers_paths[who], who)
        # What the loss cannot reach gets no gradient: frozen, so DDP finds no unused parameters.
        points = self.objective.points("student")
        self.frozen = freeze_unreached(self.student, points, student.layers_path, self.objective.needs_head)
        self.guard = NonFiniteGuard(nonfinite, nonfinite_max_skips, keep_last_good)
        self.strict_loading = not is_lora(self.student)  # see `on_save_checkpoint`
        self._step_tokens = torch.zeros(())
        self._step_finite = True  # every micro-batch of this optimizer step had a finite loss
        self.meter, self._synced_step, self._update_tokens = StepMeter(), 0, 0

    @property
    def teacher(self) -> torch.nn.Module:
        return self.frozen_teacher.model

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped

    # ---- the step -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor | None:
        self.engine.wake()
        coin_seed = rollout_seed(self.hparams.seed, self.current_epoch, batch_idx, rank=0)  # the same on every rank
        roll, on_policy = step_responses(self, batch, self._rollout_seed(batch_idx), coin_seed)
        self.engine.sleep()  # an engine on the GPU frees its memory for the update
        self.meter.rollout_done(int(roll.response_mask.sum()))
        terms = self.distill(roll)
        bad = nonfinite_term(terms.named())
        if self.trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            self._step_finite = False
            self.guard.failed(self.trainer, f"{describe_term(bad or 'loss')} is not finite", weights_broken=True)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            return None  # skips this micro-batch
        tokens = roll.response_mask.sum()
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens
        self.log_train(terms, roll)
        if self.rollout_cfg.lmbda < 1:
            self.log("train/on_policy", float(on_policy), batch_size=1)
        self._update_tokens = int(roll.attention_mask.sum())
        # A sum over tokens: `on_before_optimizer_step` divides by the whole step's token count.
        return terms.loss

    def distill(self, roll: Rollout, teacher: dict[Point, Tensor] | None = None) -> LossTerms:
        """The update's forward on one rollout: teacher states (no grad; given, or computed), student states, then
        the objective."""
        teacher = self.teacher_states(roll) if teacher is None else teacher
        gap = roll.logprobs is not None  # the engine reports its log-probs: check it samples this policy
        student = self.student_states(roll, head=self.objective.needs_head or gap)
        terms = self.objective(student, teacher, roll, self.heads() if self.objective.needs_head else None)
        if gap:
            terms.rollout_logprob_gap = self.objective.rollout_logprob_gap(student[NORM], roll, self.heads())
        return terms

    def sample(self, prompts: list[str], config: RolloutConfig, seed: int | None = None, model=None) -> Rollout:
        """Responses of `model` (default: the student) on the student's device: the student's through the rollout
        engine, any other model's through its own `generate` (an engine holds a copy of the student only)."""
        enc = format_prompts(self.tokenizer, prompts, self.hparams.max_prompt_length, self.hparams.truncate_prompts)
        model = model or self.student
        placed = self.frozen_teacher.active(self.device) if model is self.teacher else nullcontext(self.device)
        engine = self.engine if model is self.student else HFGenerateEngine()
        with placed as device:
            roll = engine.generate(
                model,
                self.tokenizer,
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device),
                config,
                seed=seed,
                synced_gpus=synced_generation(_attached_trainer(self), model),
            )
        return roll.to(self.device)

    def states(self, roll: Rollout, head: bool | None = None) -> tuple[dict[Point, Tensor], dict[Point, Tensor]]:
        """Student states (with gradient when enabled) and teacher states (no grad), `[b, t, d]` per capture point.

        The teacher's pass stops after the deepest point it needs. `head` adds the final normed states (default:
        when the objective has a token-space term).
        """
        teacher = self.teacher_states(roll, head)
        return self.student_states(roll, head), teacher

    @torch.no_grad()
    def teacher_states(self, roll: Rollout, head: bool | None = None) -> dict[Point, Tensor]:
        points = self.objective.points("teacher", head)
        with self.frozen_teacher.active(self.device) as device:
            on_device = roll.to(device)
            states = hidden_states(
                self.teacher, points, self.layers_paths["teacher"], on_device.input_ids, on_device.attention_mask
            )
        return {point: state.to(self.device) for point, state in states.items()}

    def student_states(self, roll: Rollout, head: bool | None = None) -> dict[Point, Tensor]:
        points = self.objective.points("student", head)
        return hidden_states(self.student, points, self.layers_paths["student"], roll.input_ids, roll.attention_mask)

    def heads(self) -> Heads:
        """Both output heads on the student's device (gathered when sharded)."""
        return Heads(gathered_head(self.student.get_output_embeddings()), self.frozen_teacher.head(self.device))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Exact global normalisation: micro-batches returned sums; Lightning divided them by the accumulation
        # count and DDP averaged over ranks, so multiply both back and divide by the step's total token count.
        total = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        scale_gradients(optimizer, self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp_min(1))
        self._step_tokens = torch.zeros((), device=self._step_tokens.device)
        bad = nonfinite_grads(local_grads(self.named_parameters()))
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            what = f"the gradient of {', '.join(bad) or 'a parameter on another rank'} is not finite"
            self.guard.failed(self.trainer, what, weights_broken=False)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        elif self._step_finite:  # Lightning calls this hook for skipped steps too
            self.guard.passed(self.parameters())
        self._step_finite = True

    # ---- logging --------------------------------------------------------------------------------------------

    def log_train(self, terms: LossTerms, roll: Rollout) -> None:
        metrics = {f"train/{name}": value for name, value in terms.metrics(roll.response_mask.sum()).items()}
        metrics["train/response_length"] = roll.response_lengths.float().mean()
        batch_size = roll.input_ids.shape[0]
        self.log_dict(metrics, batch_size=batch_size)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=batch_size)

    def on_train_start(self) -> None:
        # After a checkpoint is restored (a resumed run's Bridge is calibrated already), before the first step.
        if self.objective.needs_calibration:
            data = self.trainer.datamodule
            prompts = [item["prompt"] for item in data.train_items]
            metrics = calibrate_bridge(self, prompts, data.hparams.batch_size)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.meter.start(self.device)
        self._update_tokens = 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Runs after the backward and (when this micro-batch ends a step) the optimizer step: the update's full time.
        metrics = self.meter.finish(self._update_tokens)
        if metrics and self._update_tokens:
            self.log_dict(metrics, batch_size=1)
        if self.trainer.global_step != self._synced_step:  # an optimizer step happened: engines with a weight copy
            self._synced_step = self.trainer.global_step
            self.engine.sync_weights(self.student, self._synced_step)
            if self.engine.sync_s is not None:
                self.log("train/weight_sync_s", self.engine.sync_s, batch_size=1)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "val"), sync_dist=True, batch_size=len(batch["prompt"]))

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "test"), sync_dist=True, batch_size=len(batch["prompt"]))

    def evaluate(self, batch: dict[str, list], prefix: str) -> dict[str, Tensor]:
        metrics, _ = score(self, batch["prompt"], batch["answer"], self.hparams.eval_model)
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        texts = self.decode(self.sample(batch["prompt"], self.greedy_config()))
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], texts, strict=True)]

    def greedy_config(self) -> RolloutConfig:
        max_new = self.hparams.val_max_new_tokens or self.rollout_cfg.max_new_tokens
        return dataclasses.replace(self.rollout_cfg, max_new_tokens=max_new, do_sample=False, num_generations=1)

    def decode(self, roll: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(roll.responses(), skip_special_tokens=True)

    # ---- plumbing -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.frozen_teacher.rest(self.device)

    def configure_model(self) -> None:
        trainer = _attached_trainer(self)  # `load_from_checkpoint` calls this hook too: one process shards nothing
        if trainer is not None:
            configure_sharding(
                trainer.strategy,
                self.student,
                self.objective,
                self.teacher,
                self.layers_paths,
                self.hparams.shard_teacher,
                keep_head=self.objective.needs_head,
            )

    def _rollout_seed(self, batch_idx: int) -> int:
        return rollout_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A LoRA student's frozen base weights come back from its model path: only adapters and projectors are saved.
        for name in frozen_base_keys(self.student, "student."):
            checkpoint["state_dict"].pop(name, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint of another student/teacher width fails here, naming the shapes, not deep in load_state_dict.
        check_state_shapes(self, checkpoint["state_dict"], optional=frozen_base_keys(self.student, "student."))
        retune_saved_optimizer(self.optim_cfg, checkpoint)  # a resumed run takes the learning rate it is given

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.optim_cfg.schedule == "cosine" else 1
        return build_optimizer(self.optim_cfg, self.student.parameters(), self.objective.parameters(), total)


def _attached_trainer(module: L.LightningModule):
    """The module's Trainer, or None outside a fit/validate/... (the public property raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None
