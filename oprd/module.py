"""DistillModule: on-policy representation distillation as a LightningModule.

Shape legend:
    b  sequences in the micro-batch (prompts x generations)
    t  prompt + response tokens
    d  hidden width

training_step: rollout -> teacher pass (no grad, truncated) -> student pass -> losses -> log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from oprd.align import LayerMapSpec, Projectors, resolve_layer_map
from oprd.capture import HiddenCapture, find_layers
from oprd.data import format_prompts
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
)
from oprd.rollout import Rollout, RolloutConfig, rollout


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
        rollout: how the student samples during training.
        optim: optimizer and schedule.
        max_prompt_length: longest prompt in tokens.
        truncate_prompts: cut longer prompts (with a warning) instead of refusing them.
        val_max_new_tokens: response length during evaluation (greedy); default `rollout.max_new_tokens`.
        seed: base seed of the rollouts (each step's seed derives from it, so resumed runs sample the same).
    """

    def __init__(
        self,
        teacher: ModelSpec,
        student: ModelSpec,
        tokenizer: str | None = None,
        layer_map: LayerMapSpec = "uniform",
        hidden_loss: HiddenLossConfig = HiddenLossConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        max_prompt_length: int = 512,
        truncate_prompts: bool = True,
        val_max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden_cfg, self.rollout_cfg, self.optim_cfg = hidden_loss, rollout, optim
        self.tokenizer = load_tokenizer(tokenizer or student.path or teacher.path or TINY_TOKENIZER)
        if tokenizer is None and student.path and teacher.path:
            check_same_tokenizer(load_tokenizer(teacher.path), self.tokenizer)
        # Configs first: a bad layer map or vocabulary fails before any weights load.
        t_cfg, s_cfg = load_config(teacher, len(self.tokenizer)), load_config(student, len(self.tokenizer))
        check_vocab(self.tokenizer, t_cfg, "teacher")
        check_vocab(self.tokenizer, s_cfg, "student")
        self.pairs = resolve_layer_map(layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

        self.student = load_model(student, s_cfg)
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
        self.student_capture = HiddenCapture(self.student, [s for s, _ in self.pairs], student.layers_path)
        self.teacher_capture = HiddenCapture(teacher_model, [t for _, t in self.pairs], teacher.layers_path)
        self._step_tokens = torch.zeros(())

    # ---- the step -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor:
        start = time.perf_counter()
        roll = self.sample(batch["prompt"], self.rollout_cfg, seed=self._rollout_seed(batch_idx))
        rollout_s = time.perf_counter() - start
        teacher_states = self.teacher_states(roll)
        student_states = self.student_states(roll)
        sums = hidden_loss_sums(student_states, teacher_states, roll.response_mask, self.hidden_cfg)
        loss_sum = torch.stack(list(sums.values())).mean()
        tokens = roll.response_mask.sum()
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens
        self.log_train(sums, student_states, teacher_states, roll, rollout_s, time.perf_counter() - start)
        # A sum over tokens: `on_before_optimizer_step` divides by the whole step's token count.
        return loss_sum

    def sample(self, prompts: list[str], config: RolloutConfig, seed: int | None = None) -> Rollout:
        enc = format_prompts(self.tokenizer, prompts, self.hparams.max_prompt_length, self.hparams.truncate_prompts)
        synced = self.trainer.world_size > 1 if self._trainer is not None else False
        return rollout(
            self.student,
            self.tokenizer,
            enc["input_ids"].to(self.device),
            enc["attention_mask"].to(self.device),
            config,
            seed=seed,
            synced_gpus=synced,
        )

    @torch.no_grad()
    def teacher_states(self, roll: Rollout) -> dict[str, Tensor]:
        """Teacher hidden states per pair label, `[b, t, d_T]`; the pass stops after the deepest mapped layer."""
        self._place_teacher()
        states = self.teacher_capture.run(roll.input_ids, roll.attention_mask)
        return {label: states[t] for label, (_, t) in zip(self.projectors.labels, self.pairs, strict=True)}

    def student_states(self, roll: Rollout) -> dict[str, Tensor]:
        """Projected student hidden states per pair label, `[b, t, d_T]`, with gradient."""
        return self.projectors(self.student_capture.run(roll.input_ids, roll.attention_mask))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Exact global normalisation: micro-batches returned sums; Lightning divided them by the accumulation
        # count and DDP averaged over ranks, so multiply both back and divide by the step's total token count.
        total = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp_min(1)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale.to(param.grad.device))
        self._step_tokens = torch.zeros((), device=self._step_tokens.device)

    # ---- logging --------------------------------------------------------------------------------------------

    def log_train(self, sums, student_states, teacher_states, roll: Rollout, rollout_s: float, step_s: float):
        tokens = roll.response_mask.sum().clamp_min(1)
        per_pair = {label: value.detach() / tokens for label, value in sums.items()}
        metrics = {"train/loss": torch.stack(list(per_pair.values())).mean()}
        for label, value in per_pair.items():
            metrics[f"train/hidden/{label}"] = value
            metrics[f"train/cos/{label}"] = mean_cosine(
                student_states[label], teacher_states[label], roll.response_mask
            )
        metrics["train/response_length"] = roll.response_lengths.float().mean()
        metrics["train/rollout_tokens_per_s"] = torch.tensor(float(tokens) / max(rollout_s, 1e-9))
        metrics["train/tokens_per_s"] = torch.tensor(float(roll.attention_mask.sum()) / max(step_s, 1e-9))
        self.log_dict(metrics, prog_bar=False, batch_size=roll.input_ids.shape[0])
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=roll.input_ids.shape[0])

    # ---- evaluation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "val"), sync_dist=True, batch_size=len(batch["prompt"]))

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.log_dict(self.evaluate(batch, "test"), sync_dist=True, batch_size=len(batch["prompt"]))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, list], prefix: str) -> dict[str, Tensor]:
        """Greedy responses to held-out prompts, scored against the teacher's hidden states and the answers."""
        roll = self.sample(batch["prompt"], self.greedy_config())
        teacher_states, student_states = self.teacher_states(roll), self.student_states(roll)
        sums = hidden_loss_sums(student_states, teacher_states, roll.response_mask, self.hidden_cfg)
        tokens = roll.response_mask.sum()
        metrics = {f"{prefix}/hidden": torch.stack(list(sums.values())).mean() / tokens.clamp_min(1)}
        for label in sums:
            metrics[f"{prefix}/cos/{label}"] = mean_cosine(
                student_states[label], teacher_states[label], roll.response_mask
            )
        texts = self.decode(roll)
        metrics[f"{prefix}/response_length"] = roll.response_lengths.float().mean()
        metrics[f"{prefix}/distinct_4"] = torch.tensor(distinct_n(texts, 4))
        metrics[f"{prefix}/repetition"] = torch.tensor(sum(repetition_rate(t, 4) for t in texts) / len(texts))
        answers = batch["answer"]
        if all(a is not None for a in answers):
            correct = [is_correct(t, a) for t, a in zip(texts, answers, strict=True)]
            metrics[f"{prefix}/accuracy"] = torch.tensor(sum(correct) / len(correct))
        return metrics

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        roll = self.sample(batch["prompt"], self.greedy_config())
        texts = self.decode(roll)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], texts, strict=True)]

    def greedy_config(self) -> RolloutConfig:
        max_new = self.hparams.val_max_new_tokens or self.rollout_cfg.max_new_tokens
        return RolloutConfig(max_new_tokens=max_new, do_sample=False, num_generations=1)

    def decode(self, roll: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(roll.responses(), skip_special_tokens=True)

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _place_teacher(self) -> None:
        # The teacher is not a submodule, so Lightning does not move it: follow the student's device.
        param = next(self.teacher.parameters())
        if param.device != self.device:
            self.teacher.to(self.device)

    def _rollout_seed(self, batch_idx: int) -> int:
        # Derived from the position in the run, not from RNG state, so a resumed run samples what it would have.
        rank = self.global_rank if self._trainer is not None else 0
        return (self.hparams.seed * 1_000_003 + self.current_epoch * 100_003 + batch_idx * 101 + rank) % (2**63)

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
