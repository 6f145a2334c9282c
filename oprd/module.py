"""DistillModule: on-policy representation distillation as a LightningModule.

Shape legend:
    b  sequences in the micro-batch (prompts x generations)
    t  prompt + response tokens
    d  hidden width

training_step: rollout -> teacher pass (no grad, truncated) -> student pass -> losses -> log.
Multi-process training (DDP, FSDP2) lives in `oprd/sharding.py`, teacher placement in `oprd/placement.py`, throughput
metrics in `oprd/throughput.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from oprd.align import LayerMapSpec, Projectors, resolve_layer_map
from oprd.capture import NORM, HiddenCapture, Point, find_layers
from oprd.checkpoint import check_state_shapes
from oprd.data import format_prompts
from oprd.guard import describe_term, nonfinite_grads, nonfinite_term
from oprd.lm_head import token_loss_sum_from_hidden
from oprd.losses import HiddenLossConfig, hidden_loss_sums, mean_cosine
from oprd.metrics import distinct_n, is_correct, repetition_rate
from oprd.models import (
    TINY_TOKENIZER,
    ModelSpec,
    check_same_tokenizer,
    check_vocab,
    load_config,
    load_model,
    load_tokenizer,
    pruned_from,
)
from oprd.placement import TeacherPlacement
from oprd.rollout import Rollout, RolloutConfig, get_engine
from oprd.sharding import (
    data_parallel_mesh,
    freeze_unreached,
    full_forward_states,
    gathered_head,
    is_sharded,
    local_grads,
    shard_model,
)
from oprd.throughput import StepMeter
from oprd.token_losses import TokenLossConfig, with_model_logit_transforms

# Held-out reverse KL is always exact over the full vocabulary, whatever the training objective (issue: evaluation).
EVAL_KL = TokenLossConfig(objective="reverse_kl", estimator="exact")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a cosine (or constant) schedule."""

    lr: float = 1e-5
    """Learning rate of the student."""
    projector_lr: float | None = None
    """Learning rate of the projectors (None: same as `lr`); projectors between unequal widths start random."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up: cosine to zero over the run, or constant."""


class DistillModule(L.LightningModule):
    """Distil a student into a frozen teacher's hidden states on the student's own samples.

    Args:
        teacher: the frozen teacher model.
        student: the student model (trained).
        tokenizer: tokenizer id/folder/alias, or `tiny`; default: the student's, else the teacher's.
        layer_map: `uniform`, `all`, `last`, `norm`, or explicit `[[student, teacher], ...]` pairs.
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
        nonfinite: on a NaN/inf loss or gradient, `stop` (saving the last good state first) or `skip` the step.
        seed: base seed of the rollouts (each step's seed derives from it, so resumed runs sample the same).
        teacher_device: run the teacher on this device (`cuda:1`, `cpu`) instead of the student's: no teacher weights
            on the student's device; each step moves the sequences over and the captured states back.
        offload_teacher: keep the teacher in CPU memory between passes and move it to the device for its pass only:
            its P x bytes leave the device before the student's forward/backward peak; costs one host-to-device copy
            of the teacher per step (see `oprd/placement.py` for every option's memory cost).
        shard_teacher: shard the teacher with FSDP2 across all processes (under `fsdp2` or `ddp`): P x bytes / world
            size per device, one layer gathered at a time during its pass.
    """

    def __init__(
        self,
        teacher: ModelSpec,
        student: ModelSpec,
        tokenizer: str | None = None,
        layer_map: LayerMapSpec = "uniform",
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
        eval_model: Literal["student", "teacher"] = "student",
        nonfinite: Literal["stop", "skip"] = "stop",
        seed: int = 0,
        teacher_device: str | None = None,
        offload_teacher: bool = False,
        shard_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # `load_from_checkpoint` hands back the YAML round-trip of these configs: plain dicts.
        teacher, student = _as(ModelSpec, teacher), _as(ModelSpec, student)
        hidden_loss, rollout, optim = (
            _as(HiddenLossConfig, hidden_loss),
            _as(RolloutConfig, rollout),
            _as(OptimConfig, optim),
        )
        token_loss = None if token_loss is None else _as(TokenLossConfig, token_loss)
        if hidden_weight <= 0 and token_loss is None:
            raise ValueError("Nothing to optimise: set hidden_weight > 0, or a token_loss (e.g. --config opd.yaml).")
        self.hidden_cfg, self.token_cfg, self.rollout_cfg, self.optim_cfg = hidden_loss, token_loss, rollout, optim
        self.placement = TeacherPlacement(teacher_device, offload_teacher)
        if shard_teacher and (teacher_device is not None or offload_teacher):
            raise ValueError(
                "`shard_teacher` spreads the teacher over all devices: drop teacher_device/offload_teacher."
            )
        self.engine = get_engine(rollout.engine)
        self.layers_paths = {"teacher": teacher.layers_path, "student": student.layers_path}
        self.tokenizer = load_tokenizer(tokenizer or student.path or teacher.path or TINY_TOKENIZER)
        if tokenizer is None and student.path and teacher.path:
            check_same_tokenizer(load_tokenizer(teacher.path), self.tokenizer)
        # Configs first: a bad layer map or vocabulary fails before any weights load.
        t_cfg, s_cfg = load_config(teacher, len(self.tokenizer)), load_config(student, len(self.tokenizer))
        check_vocab(self.tokenizer, t_cfg, "teacher")
        check_vocab(self.tokenizer, s_cfg, "student")
        self.token_cfg = with_model_logit_transforms(token_loss, s_cfg)
        kept = pruned_from(student, len(self.tokenizer))
        pairs = resolve_layer_map(layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept)
        self.pairs = pairs if hidden_weight > 0 else []

        self.student = load_model(student, s_cfg).train()  # from_pretrained returns eval mode
        teacher_model = load_model(teacher, t_cfg).eval().requires_grad_(False)
        # Not a registered submodule: out of the optimizer, the checkpoint and the model summary.
        object.__setattr__(self, "teacher", teacher_model)
        for who, model, spec in (("student", self.student, student), ("teacher", teacher_model, teacher)):
            layers = len(find_layers(model, spec.layers_path))
            if layers != model.config.num_hidden_layers:
                raise ValueError(f"The {who} has {layers} layers but its config says {model.config.num_hidden_layers}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # projectors between unequal widths start random: make that reproducible
            self.projectors = Projectors(self.pairs, s_cfg.hidden_size, t_cfg.hidden_size)
        # What the loss cannot reach gets no gradient: frozen, so DDP finds no unused parameters (oprd/sharding.py).
        needs_head = token_loss is not None
        points = [s for s, _ in self.pairs] + ([NORM] if needs_head else [])
        self.frozen = freeze_unreached(self.student, points, student.layers_path, needs_head)
        self._step_tokens = torch.zeros(())
        self.skipped_steps = 0
        self.meter, self._synced_step, self._update_tokens = StepMeter(), 0, 0

    # ---- the step -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor | None:
        roll = self.sample(batch["prompt"], self.rollout_cfg, seed=self._rollout_seed(batch_idx))
        self.meter.rollout_done(int(roll.response_mask.sum()))
        need_norm = self.token_cfg is not None
        teacher_states = self.teacher_states(roll, need_norm)
        student_states = self.student_states(roll, need_norm)
        terms = self.loss_terms(student_states, teacher_states, roll, self.token_cfg)
        bad = nonfinite_term(terms)
        if self.trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            return self._nonfinite(f"{describe_term(bad or 'loss')} is not finite")  # None skips this micro-batch
        tokens = roll.response_mask.sum()
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens
        self.log_train(terms, roll)
        self._update_tokens = int(roll.attention_mask.sum())
        # A sum over tokens: `on_before_optimizer_step` divides by the whole step's token count.
        return terms["loss"]

    def sample(self, prompts: list[str], config: RolloutConfig, seed: int | None = None, model=None) -> Rollout:
        """Responses of `model` (default: the student) through the rollout engine, on the student's device."""
        enc = format_prompts(self.tokenizer, prompts, self.hparams.max_prompt_length, self.hparams.truncate_prompts)
        model = model or self.student
        teacher = model is self.teacher
        with self.placement.active(model, self.device) if teacher else contextlib.nullcontext(self.device) as device:
            roll = self.engine.generate(
                model,
                self.tokenizer,
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device),
                config,
                seed=seed,
                synced_gpus=self._synced_gpus(model),
            )
        return _to(roll, self.device)

    @torch.no_grad()
    def teacher_states(self, roll: Rollout, need_norm: bool = False) -> dict[Point, Tensor]:
        """Teacher hidden states per capture point, `[b, t, d_T]`; the pass stops after the deepest one needed."""
        points = [t for _, t in self.pairs] + ([NORM] if need_norm else [])
        with self.placement.active(self.teacher, self.device) as device:
            states = self._states(self.teacher, points, "teacher", _to(roll, device))
        return {point: state.to(self.device) for point, state in states.items()}

    def student_states(self, roll: Rollout, need_norm: bool = False) -> dict[Point, Tensor]:
        """Student hidden states per capture point, `[b, t, d_S]`, with gradient when enabled."""
        points = [s for s, _ in self.pairs] + ([NORM] if need_norm else [])
        return self._states(self.student, points, "student", roll)

    def _states(self, model, points: list[Point], who: str, roll: Rollout) -> dict[Point, Tensor]:
        if is_sharded(model):
            return full_forward_states(model, points, self.layers_paths[who], roll.input_ids, roll.attention_mask)
        return HiddenCapture(model, points, self.layers_paths[who]).run(roll.input_ids, roll.attention_mask)

    def loss_terms(self, student_states, teacher_states, roll: Rollout, token_cfg: TokenLossConfig | None):
        """Token sums of each term and their weighted mix: `L = w_token * L_token + mu * L_hidden` (OPRD Eq. 7).

        Returns:
            `loss` (what backward sees), `hidden` (mean over pairs), `hidden/<pair>`, `token` when configured, and
            the effective weights; all are sums over response tokens.
        """
        hp, zero = self.hparams, roll.response_mask.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {"hidden": zero, "hidden_weight": torch.tensor(float(hp.hidden_weight))}
        if self.pairs:
            projected = self.projectors(student_states)
            targets = {
                label: teacher_states[t] for label, (_, t) in zip(self.projectors.labels, self.pairs, strict=True)
            }
            sums = hidden_loss_sums(projected, targets, roll.response_mask, self.hidden_cfg)
            terms.update({f"hidden/{label}": value for label, value in sums.items()})
            terms.update(
                {f"cos/{label}": mean_cosine(projected[label], targets[label], roll.response_mask) for label in sums}
            )
            terms["hidden"] = torch.stack(list(sums.values())).mean()
        loss = hp.hidden_weight * terms["hidden"]
        if token_cfg is not None:
            terms["token"] = self.token_sum(student_states, teacher_states, roll, token_cfg)
            if hp.balance and self.pairs:
                ratio = terms["token"].detach() / terms["hidden"].detach().clamp_min(1e-12)
                terms["hidden_weight"] = hp.hidden_weight * ratio
            loss = hp.token_weight * terms["token"] + terms["hidden_weight"] * terms["hidden"]
        terms["loss"] = loss
        return terms

    def token_sum(self, student_states, teacher_states, roll: Rollout, config: TokenLossConfig) -> Tensor:
        """Token-space loss summed over response tokens: position t-1's distribution predicts response token t."""
        return token_loss_sum_from_hidden(
            student_states[NORM][:, :-1],
            gathered_head(self.student.get_output_embeddings()),
            teacher_states[NORM][:, :-1],
            self.placement.head(self.teacher, self.device),
            roll.input_ids[:, 1:],
            roll.response_mask[:, 1:],
            config,
            len(self.tokenizer),
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        # Exact global normalisation: micro-batches returned sums; Lightning divided them by the accumulation
        # count and DDP averaged over ranks, so multiply both back and divide by the step's total token count.
        total = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        # A Python float: FSDP2 gradients are DTensors, which refuse arithmetic with plain tensors.
        scale = float(self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp_min(1))
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self._step_tokens = torch.zeros((), device=self._step_tokens.device)
        bad = nonfinite_grads(local_grads(self.named_parameters()))
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self._nonfinite(f"the gradient of {', '.join(bad) or 'a parameter on another rank'} is not finite")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched

    def _nonfinite(self, what: str) -> None:
        """Stop with a checkpoint of the last good state, or count and skip the step (`nonfinite: skip`)."""
        step = self.trainer.global_step
        if self.hparams.nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            return None
        path = Path(self.trainer.default_root_dir) / f"nonfinite-step{step}-last-good.ckpt"
        self.trainer.save_checkpoint(path)  # the bad update was not applied: these weights are the last good ones
        raise FloatingPointError(
            f"Step {step}: {what}. Saved the last good state to {path}. Lower the learning rate, set "
            "`model.nonfinite: skip` to skip such steps, or resume from the checkpoint with --ckpt_path."
        )

    # ---- logging --------------------------------------------------------------------------------------------

    def log_train(self, terms, roll: Rollout):
        tokens = roll.response_mask.sum().clamp_min(1).float()
        metrics = {f"train/{k}": v.detach() / tokens for k, v in terms.items() if k.startswith(("hidden", "token"))}
        metrics.update({f"train/{k}": v for k, v in terms.items() if k.startswith("cos/")})
        metrics["train/loss"] = terms["loss"].detach() / tokens
        metrics["train/hidden_weight"] = torch.as_tensor(terms["hidden_weight"]).detach().float()
        if "token" in terms:
            metrics["train/token_kl"] = metrics.pop("train/token")
            metrics["train/token_weight"] = torch.tensor(float(self.hparams.token_weight))
        metrics["train/response_length"] = roll.response_lengths.float().mean()
        batch_size = roll.input_ids.shape[0]
        self.log_dict(metrics, batch_size=batch_size)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=batch_size)

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

    # ---- evaluation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "val"), sync_dist=True, batch_size=len(batch["prompt"]))

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "test"), sync_dist=True, batch_size=len(batch["prompt"]))

    def evaluate(self, batch: dict[str, list], prefix: str) -> dict[str, Tensor]:
        metrics, _ = self.score(batch["prompt"], batch["answer"], self.hparams.eval_model)
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    @torch.no_grad()
    def score(
        self, prompts: list[str], answers: list[str | None], responder: str = "student", per_row: bool = False
    ) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
        """Greedy responses to held-out prompts, scored by the teacher (exact reverse KL, hidden states) and answers.

        Args:
            responder: `student` or `teacher`: who answers (the teacher scores either way).
            per_row: also compute each response's own reverse KL (for sample tables).

        Returns:
            batch metrics (`reverse_kl`, `hidden`, `cos/<pair>`, `accuracy`, ...) and one dict per response.
        """
        roll = self.sample(prompts, self.greedy_config(), model=self.teacher if responder == "teacher" else None)
        texts = self.decode(roll)
        metrics = {"reverse_kl": torch.zeros(())}  # the teacher's answers, scored against itself: 0 by definition
        if responder != "teacher":
            teacher_states, student_states = self.teacher_states(roll, True), self.student_states(roll, True)
            terms = self.loss_terms(student_states, teacher_states, roll, EVAL_KL)
            metrics["reverse_kl"] = terms["token"] / roll.response_mask.sum().clamp_min(1).float()
            if self.pairs:
                metrics["hidden"] = terms["hidden"] / roll.response_mask.sum().clamp_min(1).float()
                metrics.update({k: v for k, v in terms.items() if k.startswith("cos/")})
        metrics["response_length"] = roll.response_lengths.float().mean()
        metrics["distinct_4"] = torch.tensor(distinct_n(texts, 4))
        metrics["repetition"] = torch.tensor(sum(repetition_rate(t, 4) for t in texts) / len(texts))
        correct = [is_correct(t, a) for t, a in zip(texts, answers, strict=True)]
        if all(a is not None for a in answers):
            metrics["accuracy"] = torch.tensor(sum(correct) / len(correct))
        rows = [
            {"prompt": p, "response": t, "answer": a, "correct": c}
            for p, t, a, c in zip(prompts, texts, answers, correct, strict=True)
        ]
        if per_row and responder != "teacher":
            for i, row in enumerate(rows):
                one = Rollout(
                    roll.input_ids[i : i + 1],
                    roll.attention_mask[i : i + 1],
                    roll.response_mask[i : i + 1],
                    roll.prompt_length,
                )
                kl = self.token_sum(
                    {NORM: student_states[NORM][i : i + 1]}, {NORM: teacher_states[NORM][i : i + 1]}, one, EVAL_KL
                )
                row["reverse_kl"] = float(kl / one.response_mask.sum().clamp_min(1))
        return metrics, rows

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        roll = self.sample(batch["prompt"], self.greedy_config())
        texts = self.decode(roll)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], texts, strict=True)]

    def greedy_config(self) -> RolloutConfig:
        max_new = self.hparams.val_max_new_tokens or self.rollout_cfg.max_new_tokens
        return replace(self.rollout_cfg, max_new_tokens=max_new, do_sample=False, num_generations=1)

    def decode(self, roll: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(roll.responses(), skip_special_tokens=True)

    # ---- plumbing -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._place_teacher()

    def _place_teacher(self) -> None:
        # The teacher is not a submodule, so Lightning does not move it: place it where it waits between passes.
        if not is_sharded(self.teacher):
            self.placement.rest(self.teacher, self.device)

    def configure_model(self) -> None:
        """FSDP2: shard the student and projectors under `fsdp2` / ModelParallelStrategy, the teacher on request."""
        if self._trainer is None:  # `load_from_checkpoint` calls this hook too: a single process shards nothing
            return
        strategy = self.trainer.strategy
        sharded = isinstance(strategy, ModelParallelStrategy)
        if self.hparams.shard_teacher and strategy.world_size == 1:
            rank_zero_warn("`shard_teacher` needs 2+ processes; the teacher stays whole.")
        if is_sharded(self.student) or not (sharded or (self.hparams.shard_teacher and strategy.world_size > 1)):
            return
        mesh = data_parallel_mesh(strategy, strategy.root_device)
        if sharded:
            # A token-space term reads the LM head outside the forward: keep the root gathered until the backward.
            shard_model(self.student, mesh, self.layers_paths["student"], reshard_root=self.token_cfg is None)
            if self.pairs:
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.projectors, mesh=mesh)
        if self.hparams.shard_teacher and not is_sharded(self.teacher):
            shard_model(self.teacher.to(strategy.root_device), mesh, self.layers_paths["teacher"])

    def _synced_gpus(self, model) -> bool:
        # Sharded models all-gather inside forward: every rank must run as many forwards as the slowest (DESIGN.md).
        # DDP needs no sync (its collectives run in the backward); other multi-process strategies (DeepSpeed) may.
        if self._trainer is None or self.trainer.world_size == 1:
            return False
        return is_sharded(model) or not isinstance(self.trainer.strategy, (DDPStrategy, ModelParallelStrategy))

    def _rollout_seed(self, batch_idx: int) -> int:
        # Derived from the position in the run, not from RNG state, so a resumed run samples what it would have.
        rank = self.global_rank if self._trainer is not None else 0
        return (self.hparams.seed * 1_000_003 + self.current_epoch * 100_003 + batch_idx * 101 + rank) % (2**63)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint of another student/teacher width fails here, naming the shapes, not deep in load_state_dict.
        check_state_shapes(self, checkpoint["state_dict"])

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = [
            {"params": [p for p in self.student.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": list(self.projectors.parameters()), "lr": cfg.projector_lr or cfg.lr},
        ]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if cfg.schedule == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Checkpoints of Python-API runs hold these configs as objects; torch.load(weights_only=True) must accept them.
torch.serialization.add_safe_globals([ModelSpec, HiddenLossConfig, RolloutConfig, OptimConfig, TokenLossConfig])


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else value


def _to(roll: Rollout, device: torch.device) -> Rollout:
    if roll.input_ids.device == device:
        return roll
    return replace(
        roll,
        input_ids=roll.input_ids.to(device),
        attention_mask=roll.attention_mask.to(device),
        response_mask=roll.response_mask.to(device),
    )
