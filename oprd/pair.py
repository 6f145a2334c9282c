"""The student, its frozen teacher and their shared tokenizer: read, loaded, sampled and captured together.

Shape legend:
    b  sequences (prompts x generations)
    t  prompt + response tokens
    d  hidden width

`PairConfigs.read` checks everything a config can tell (tokenizers, vocabularies, position limits, pruning) before a
single weight loads; `ModelPair` then loads both models and holds what each step reads from them: samples (through
the rollout engine), hidden states at capture points, and the output heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from oprd.data import format_prompts
from oprd.models.capture import Point, hidden_states
from oprd.models.layers import check_layer_count
from oprd.models.spec import ModelSpec, choose_depth, load_config, load_model, pruned_from
from oprd.models.tokenizers import check_positions, check_vocab, pair_tokenizer
from oprd.objective.objective import Heads
from oprd.parallel.placement import FrozenTeacher, TeacherPlacement
from oprd.parallel.remote import RemoteTeacher
from oprd.parallel.sharding import gathered_head
from oprd.rollout.engine import HFGenerateEngine, RolloutEngine
from oprd.rollout.sampling import Rollout, RolloutConfig


@dataclass(frozen=True)
class PairConfigs:
    """A pair's tokenizer and model configs, read and checked before any weights load: a wrong vocabulary or a
    sequence past the position limit fails in seconds, not after the teacher has loaded."""

    tokenizer: Any
    teacher: PretrainedConfig
    student: PretrainedConfig
    kept: list[int] | None
    """The teacher-side indices of the layers a depth-pruned student kept; None when it is not pruned."""

    @classmethod
    def read(
        cls, teacher: ModelSpec, student: ModelSpec, tokenizer: str | None, max_prompt_length: int, max_new_tokens: int
    ) -> PairConfigs:
        tok = pair_tokenizer(tokenizer, teacher, student)
        t_cfg, s_cfg = load_config(teacher, len(tok)), load_config(student, len(tok))
        check_vocab(tok, t_cfg, "teacher")
        check_vocab(tok, s_cfg, "student")
        check_positions(max_prompt_length, max_new_tokens, t_cfg, s_cfg)
        return cls(tok, t_cfg, s_cfg, pruned_from(student, len(tok)))


def choose_student_layers(
    teacher: ModelSpec, student: ModelSpec, tokenizer: str | None, max_prompt_length: int, max_new_tokens: int
) -> ModelSpec:
    """The student spec with the layers its `depth` asks for chosen by importance (`choose_depth`); any other spec
    as it is. Everything the configs can tell is checked first, on the same number of layers, before the ranking
    loads a model."""
    if student.depth is None or student.keep_layers is not None:
        return student
    placeholder = dataclasses.replace(student, keep_layers=list(range(student.depth.num_layers)))
    configs = PairConfigs.read(teacher, placeholder, tokenizer, max_prompt_length, max_new_tokens)
    return choose_depth(student, configs.tokenizer)


class ModelPair:
    """The trained student and the frozen teacher over one tokenizer.

    A plain object: the module registers `student` as its submodule (checkpoint keys `student.*`), and the teacher
    stays in its `FrozenTeacher`, out of the optimizer and the checkpoint.

    Args:
        teacher, student: where each model comes from.
        configs: their configs, from `PairConfigs.read`.
        placement: where the teacher lives (device, CPU offload).
        engine: samples the student's responses.
        max_prompt_length: longest prompt in tokens.
        truncate_prompts: cut longer prompts (with a warning) instead of refusing them.
        student_model: the student, already loaded (another teacher's pair over the same student); None: load it.
    """

    def __init__(
        self,
        teacher: ModelSpec,
        student: ModelSpec,
        configs: PairConfigs,
        placement: TeacherPlacement,
        engine: RolloutEngine,
        max_prompt_length: int = 512,
        truncate_prompts: bool = True,
        student_model: nn.Module | None = None,
    ) -> None:
        self.tokenizer, self.engine = configs.tokenizer, engine
        self.max_prompt_length, self.truncate_prompts = max_prompt_length, truncate_prompts
        self.layers_paths = {"teacher": teacher.layers_path, "student": student.layers_path}
        if placement.remote is not None:  # first: an unreachable cluster fails before the student loads
            self.frozen_teacher = RemoteTeacher(teacher, configs.teacher, self.tokenizer, placement.remote)
        if student_model is None:
            student_model = load_model(student, configs.student, self.tokenizer).train()  # from_pretrained: eval mode
        self.student = student_model
        check_layer_count(self.student, self.layers_paths["student"], "student")
        if placement.remote is None:
            self.frozen_teacher = FrozenTeacher(load_model(teacher, configs.teacher, self.tokenizer), placement)
            check_layer_count(self.teacher, self.layers_paths["teacher"], "teacher")

    @property
    def teacher(self) -> nn.Module | RemoteTeacher:
        """The teacher module, or its `RemoteTeacher` when it runs elsewhere (pass it as `sample`'s `model`)."""
        return self.frozen_teacher if self.remote else self.frozen_teacher.model

    @property
    def remote(self) -> bool:
        """Whether the teacher runs outside this process (no teacher module here)."""
        return isinstance(self.frozen_teacher, RemoteTeacher)

    @property
    def device(self) -> torch.device:
        """The student's device (where rollouts, states and heads are returned)."""
        return next(self.student.parameters()).device

    def format(self, prompts: list[str]) -> dict[str, Tensor]:
        """Chat-formatted, left-padded prompt ids and attention mask, `[b, p]`."""
        return format_prompts(self.tokenizer, prompts, self.max_prompt_length, self.truncate_prompts)

    def sample(
        self,
        prompts: list[str],
        config: RolloutConfig,
        seed: int | None = None,
        model: nn.Module | None = None,
        synced: bool = False,
    ) -> Rollout:
        """Responses of `model` (default: the student) on the student's device: the student's through the rollout
        engine, the teacher's where it lives, any other model's through its own `generate` (an engine holds a copy
        of the student only).

        Args:
            synced: keep the ranks in lock-step (`synced_gpus`), for sharded models.
        """
        enc, model = self.format(prompts), model or self.student
        if model is self.teacher:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            return self.frozen_teacher.generate(self.tokenizer, ids, mask, config, seed, self.device, synced)
        engine = self.engine if model is self.student else HFGenerateEngine()
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return engine.generate(model, self.tokenizer, ids, mask, config, seed=seed, synced_gpus=synced).to(self.device)

    @torch.no_grad()
    def teacher_states(self, roll: Rollout, points: list[Point]) -> dict[Point, Tensor]:
        """The teacher's states `[b, t, d]` at `points`, on the student's device; its pass stops after the deepest."""
        return self.frozen_teacher.states(roll, points, self.layers_paths["teacher"], self.device)

    @torch.no_grad()
    def request_teacher_states(
        self, roll: Rollout, points: list[Point], projection: dict[str, tuple[Point, Tensor, Tensor]] | None = None
    ) -> Callable[[], tuple[dict[Point, Tensor], dict[str, Tensor]]]:
        """The teacher's states at `points` (and with a `projection`, a remote teacher's Bridge coordinates per pair
        label, computed on the replica: `RemoteTeacher.request_states`), as a function that returns them. A remote
        teacher's request leaves now and the function waits for it, so the student's forward runs meanwhile; an
        in-process teacher computes them now."""
        if self.remote:
            return self.frozen_teacher.request_states(roll, points, projection or {}, self.device)
        if projection:
            raise ValueError("Only a remote teacher projects its own states; an in-process one hands them over whole.")
        states = self.teacher_states(roll, points)
        return lambda: (states, {})

    def student_states(self, roll: Rollout, points: list[Point]) -> dict[Point, Tensor]:
        """The student's states `[b, t, d]` at `points` (with gradient when enabled)."""
        return hidden_states(self.student, points, self.layers_paths["student"], roll.input_ids, roll.attention_mask)

    def heads(self) -> Heads:
        """Both output heads on the student's device (gathered when sharded)."""
        return Heads(gathered_head(self.student.get_output_embeddings()), self.frozen_teacher.head(self.device))

    def decode(self, roll: Rollout) -> list[str]:
        """The response texts, without special tokens."""
        return self.tokenizer.batch_decode(roll.responses(), skip_special_tokens=True)
