"""Distiller: on-policy representation distillation without Lightning.

It holds the pair, the objective and the settings, and does a step's work: the responses (on- or off-policy), both
models' states, the objective's terms, the calibration of the Bridge or `select`. Several teachers (`model.teachers`)
are one Distiller each over the same student, held by the first, which routes each prompt to its own (`route`).
Held-out scoring (`oprd.evaluation.scoring`), compare's probe and the report take a Distiller; `DistillModule` is the
Lightning glue around one (hooks, logging, optimizer). Everything a step calls goes down from here, never back up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from oprd.models.capture import NORM, Point
from oprd.models.spec import ModelSpec
from oprd.objective.calibration import calibrate_projectors, copy_select_channels
from oprd.objective.layer_map import LayerMapSpec
from oprd.objective.objective import LossTerms, Objective, ObjectiveConfig
from oprd.pair import ModelPair, PairConfigs, choose_student_layers
from oprd.parallel.placement import TeacherPlacement
from oprd.parallel.remote import RemoteTeacherConfig
from oprd.parallel.sharding import configure_sharding, freeze_unreached, gathered
from oprd.rollout.engine import get_engine
from oprd.rollout.mixing import check_responses, coin_seed, is_on_policy
from oprd.rollout.sampling import Rollout, RolloutConfig, eos_ids, rollout_from_responses

Responder = Literal["student", "teacher"]

DEFAULT_TEACHER = "default"
"""`model.teacher`'s name beside `model.teachers`: prompts with no `teacher` column (or naming it) learn from it."""


@dataclass(frozen=True)
class TeacherConfig:
    """One more teacher (`model.teachers.<name>`): the prompts whose `teacher` column holds `<name>` learn from it,
    through their own layer map and projectors (checkpointed as `teacher_objectives.<name>.*`); the objective's other
    settings are `model.objective`'s."""

    model: ModelSpec
    """Where the teacher comes from, as `model.teacher` says it (`{path: ...}`); the student's tokenizer must fit it."""
    layer_map: LayerMapSpec | None = None
    """Its layer map (`model.objective.layer_map`'s values); None: `model.objective.layer_map`."""
    placement: TeacherPlacement = TeacherPlacement()
    """Where it runs, as `model.teacher_placement` says it (a remote one's replicas default to the actor name
    `oprd-teacher-<name>`)."""


@dataclass(frozen=True)
class EvalConfig:
    """Held-out scoring in validate/test and the report (`model.eval`)."""

    max_new_tokens: int | None = None
    """Greedy response length; None: the rollout's `max_new_tokens`."""
    model: Responder = "student"
    """Who answers the held-out prompts in validate/test: the `student` or the `teacher`."""
    samples: int = 0
    """k > 0 adds `accuracy_avg@k` and `accuracy_best@k` (k samples per prompt) to held-out scoring."""
    temperature: float = 0.7
    """Sampling temperature of `samples` (the OPRD paper: 0.7)."""
    top_p: float = 0.95
    """Nucleus threshold of `samples` (the OPRD paper: 0.95)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (or null: the rollout's), got {self.max_new_tokens}.")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}.")
        if self.samples and not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite to sample, got {self.temperature}.")
        if self.samples and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")


class Distiller:
    """A student, its frozen teacher and the objective between them, with the settings of a run.

    Args:
        pair: the two models and their tokenizer.
        objective: the terms and what is learned besides the student.
        rollout: how the student samples during training (and the on-policy fraction).
        evaluation: how held-out prompts are answered.
        seed: base seed of the rollouts, the on/off-policy coins and the calibration rollouts.
        others: more teachers by name (`model.teachers`), each a Distiller over the same student: `route` sends each
            prompt to its own.
        freeze: freeze what no objective reaches (the Distillers in `others` leave it to this one).

    Attributes:
        lockstep: whether `generate` must keep the ranks in lock-step for a model (`synced_gpus`); a trainer that
            shards sets it (default: never).
        frozen: the student's parameters the objective cannot reach, frozen (so DDP finds no unused parameters).
        student_spec: where the student came from, with a depth-pruned student's chosen layers (`build` sets it).
    """

    def __init__(
        self,
        pair: ModelPair,
        objective: Objective,
        rollout: RolloutConfig,
        evaluation: EvalConfig,
        seed: int = 0,
        others: Mapping[str, Distiller] | None = None,
        freeze: bool = True,
    ) -> None:
        self.pair, self.objective, self.rollout, self.evaluation, self.seed = pair, objective, rollout, evaluation, seed
        self.others = dict(others or {})
        self._lockstep: Callable[[nn.Module], bool] = lambda model: False
        # Projectors are float32 (bf16/fp16 states are compared in float32) unless the student is float64: then the
        # whole step stays float64, so two orders of the same computation can be compared far below float32 round-off.
        objective.projectors.to(torch.promote_types(next(self.student.parameters()).dtype, torch.float32))
        objectives = [each.objective for each in self.per_teacher]
        points = [point for each in objectives for point in each.points("student")]
        needs_head = any(each.needs_head for each in objectives)
        layers = pair.layers_paths["student"]
        self.frozen = freeze_unreached(self.student, points, layers, needs_head) if freeze else []
        self.student_spec: ModelSpec | None = None

    @property
    def lockstep(self) -> Callable[[nn.Module], bool]:
        return self._lockstep

    @lockstep.setter
    def lockstep(self, value: Callable[[nn.Module], bool]) -> None:
        self._lockstep = value
        for other in self.others.values():
            other.lockstep = value

    @classmethod
    def build(
        cls,
        teacher: ModelSpec,
        student: ModelSpec,
        objective: ObjectiveConfig = ObjectiveConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        evaluation: EvalConfig = EvalConfig(),
        *,
        tokenizer: str | None = None,
        max_prompt_length: int = 512,
        truncate_prompts: bool = True,
        placement: TeacherPlacement = TeacherPlacement(),
        seed: int = 0,
        teachers: Mapping[str, TeacherConfig] | None = None,
    ) -> Distiller:
        """Read and check every config (a bad layer map, vocabulary or position limit fails before any weights
        load), choose a depth-pruned student's layers, then load the pair (and `teachers`, beside it on the same
        student). `student_spec` holds the spec with the chosen layers."""
        teachers = dict(teachers or {})
        check_teachers(teachers, rollout)
        max_new_tokens = max(rollout.max_new_tokens, evaluation.max_new_tokens or 0)
        student = choose_student_layers(teacher, student, tokenizer, max_prompt_length, max_new_tokens)

        def read(spec: ModelSpec, config: ObjectiveConfig) -> tuple[PairConfigs, Objective]:
            configs = PairConfigs.read(spec, student, tokenizer, max_prompt_length, max_new_tokens)
            vocab = len(configs.tokenizer)
            return configs, Objective.from_config(config, configs.student, configs.teacher, vocab, configs.kept, seed)

        configs, built = read(teacher, objective)
        more = {}
        for name, entry in teachers.items():  # every teacher's configs and layer map, before any weights load
            own = objective if entry.layer_map is None else dataclasses.replace(objective, layer_map=entry.layer_map)
            try:
                more[name] = (entry, *read(entry.model, own))
            except ValueError as err:
                raise ValueError(f"model.teachers.{name}: {err}") from err
        engine = get_engine(rollout.engine)
        pair = ModelPair(teacher, student, configs, placement, engine, max_prompt_length, truncate_prompts)
        others = {}
        for name, (entry, entry_configs, entry_built) in more.items():
            placed = _named_replicas(entry.placement, name)
            entry_pair = ModelPair(
                entry.model, student, entry_configs, placed, engine, max_prompt_length, truncate_prompts, pair.student
            )
            others[name] = cls(entry_pair, entry_built, rollout, evaluation, seed, freeze=False)
        distiller = cls(pair, built, rollout, evaluation, seed, others)
        distiller.student_spec = student
        return distiller

    @property
    def student(self) -> nn.Module:
        return self.pair.student

    @property
    def per_teacher(self) -> list[Distiller]:
        """One Distiller per teacher: this one (`model.teacher`), then those of `model.teachers`."""
        return [self, *self.others.values()]

    @property
    def needs_calibration(self) -> bool:
        """Whether some teacher's projectors (Bridge, select) are still to be calibrated."""
        return any(each.objective.needs_calibration for each in self.per_teacher)

    def teacher(self, name: str | None) -> Distiller:
        """The Distiller of teacher `name` (None or `default`: this one)."""
        if name is None or name == DEFAULT_TEACHER:
            return self
        if name not in self.others:
            has = f"model.teachers: {', '.join(self.others)}" if self.others else "model.teachers is not set"
            raise ValueError(
                f"A prompt's `teacher` column names {name!r}, which is not a teacher of this run ({has}; leave the "
                "column out for model.teacher)."
            )
        return self.others[name]

    def route(self, names: list[str | None] | None, count: int) -> list[tuple[str, Distiller, list[int]]]:
        """`count` prompts grouped by their teacher (`names`: each prompt's `teacher` column; None: all
        `model.teacher`'s): `(name, its Distiller, the prompts' indices)`, the teachers in order of first use."""
        if names is None:
            return [(DEFAULT_TEACHER, self, list(range(count)))]
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(name or DEFAULT_TEACHER, []).append(index)
        return [(name, self.teacher(name), indices) for name, indices in groups.items()]

    def rest_teachers(self, device: torch.device) -> None:
        """Every teacher where its placement keeps it between passes, beside a student on `device`."""
        for each in self.per_teacher:
            each.pair.frozen_teacher.rest(device)

    def shard(self, strategy, shard_teacher: bool = False) -> None:
        """Shard the student and projectors under `fsdp2`, and the teacher too on request (`configure_sharding`)."""
        if self.others and strategy.world_size > 1:
            raise ValueError(
                "model.teachers runs in one process for now: a step whose prompts skip a teacher leaves its projectors "
                "without gradients, which DDP and FSDP2 refuse. Train with one device, or one teacher."
            )
        student, objective, layers = self.student, self.objective, self.pair.layers_paths
        keep_head = objective.needs_head
        configure_sharding(strategy, student, objective, self.pair.teacher, layers, shard_teacher, keep_head=keep_head)

    # ---- responses --------------------------------------------------------------------------------------------

    def sample(self, prompts: list[str], config: RolloutConfig, seed: int | None = None, model=None) -> Rollout:
        """Responses of `model` (default: the student), in lock-step across ranks where the strategy needs it."""
        synced = self.lockstep(model or self.student)
        return self.pair.sample(prompts, config, seed=seed, model=model, synced=synced)

    def responses(
        self, batch: dict[str, list], seed: int, coin: int | None = None, lmbda: float | None = None
    ) -> tuple[Rollout, bool]:
        """A step's responses, and whether they are the student's own (GKD's mixing, `oprd.rollout.mixing`).

        Args:
            seed: samples the responses (one per rank).
            coin: picks on- or off-policy (default `seed`); the same on every rank, since a sharded student
                generates in lock-step and all ranks must take the same branch.
            lmbda: this step's on-policy fraction (default `rollout.lmbda`).
        """
        config = self.rollout
        if is_on_policy(config.lmbda if lmbda is None else lmbda, seed if coin is None else coin):
            return self.sample(batch["prompt"], config, seed=seed), True
        if config.seq_kd:
            return self.sample(batch["prompt"], config, seed=seed, model=self.pair.teacher), False
        check_responses(batch["response"])
        tokenizer, prompts = self.pair.tokenizer, self.pair.format(batch["prompt"])
        eos = eos_ids(self.student, tokenizer)
        roll = rollout_from_responses(
            tokenizer, prompts["input_ids"], prompts["attention_mask"], batch["response"], eos, config.max_new_tokens
        )
        return roll.to(self.pair.device), False

    def step_responses(self, batch: dict[str, list], step: int, seed: int) -> tuple[Rollout, bool, float]:
        """Optimizer step `step`'s responses sampled with `seed`: one on/off-policy coin per optimizer step (every
        micro-batch and rank takes the same kind), at the step's scheduled fraction. Returns the rollout, whether it
        is on-policy and that fraction."""
        lmbda = self.rollout.lmbda_at(step)
        self.pair.engine.wake()
        roll, on_policy = self.responses(batch, seed, coin_seed(self.seed, step), lmbda)
        self.pair.engine.sleep()  # an engine on the GPU frees its memory for the update
        return roll, on_policy, lmbda

    # ---- states and terms -------------------------------------------------------------------------------------

    def states(self, roll: Rollout, head: bool | None = None) -> tuple[dict[Point, Tensor], dict[Point, Tensor]]:
        """Student states (with gradient when enabled) and teacher states (no grad), `[b, t, d]` per capture point of
        the objective; `head` adds the final normed states (default: when the objective has a token-space term)."""
        teacher = self.pair.teacher_states(roll, self.objective.points("teacher", head))
        return self.pair.student_states(roll, self.objective.points("student", head)), teacher

    def distill_routed(self, roll: Rollout, names: list[str | None] | None, step: int | None = None) -> LossTerms:
        """`distill` with each prompt's rows against its own teacher (`route`); one teacher: `distill` itself."""
        if names is None:
            return self.distill(roll, step=step)
        routes = self.route(names, len(names))
        if not self.others:
            return self.distill(roll, step=step)  # every prompt is model.teacher's: `route` refuses any other name
        per_prompt = len(roll.input_ids) // len(names)  # rows are prompt-major: num_generations per prompt
        parts = {}
        for name, distiller, indices in routes:
            rows = [index * per_prompt + k for index in indices for k in range(per_prompt)]
            parts[name] = distiller.distill(roll.select(rows), step=step)
        return LossTerms.merged(parts)

    def distill(self, roll: Rollout, teacher: dict[Point, Tensor] | None = None, step: int | None = None) -> LossTerms:
        """The update's forward on one rollout: teacher states (no grad; given, or computed), student states, then
        the objective at optimizer step `step` (its weights; None: those after any warm start)."""
        objective, targets = self.objective, None
        if teacher is None:  # a remote teacher works on this request while the student's forward runs here
            # With a calibrated Bridge, a remote teacher sends its r coordinates per token and pair, not its d_t states.
            projection = objective.teacher_projection() if self.pair.remote else None
            answer = self.pair.request_teacher_states(roll, objective.sent_whole(projection), projection)
        gap = roll.logprobs is not None  # the engine reports its log-probs: check it samples this policy
        student = self.pair.student_states(roll, objective.points("student", objective.needs_head or gap))
        if teacher is None:
            teacher, targets = answer()
            targets = targets or None
        heads = self.pair.heads() if objective.needs_head or gap else None
        terms = objective(student, teacher, roll, heads if objective.needs_head else None, targets=targets, step=step)
        if gap:
            terms.rollout_logprob_gap = objective.rollout_logprob_gap(student[NORM], roll, heads)
        return terms

    # ---- calibration ------------------------------------------------------------------------------------------

    def calibrate(self, prompts: list[str], batch_size: int, names: list[str | None] | None = None) -> dict[str, float]:
        """Calibrate the projectors (Bridge, select) on `prompts` (the run's training prompts) if they are not
        calibrated yet; returns their metrics, empty when there was nothing to do. With several teachers each
        calibrates on the prompts routed to it (`names`), its metrics named `<teacher>/<metric>`."""
        if not self.others:
            return self._calibrate_own(prompts, batch_size)
        metrics = {}
        for name, distiller, indices in self.route(names, len(prompts)):
            found = distiller._calibrate_own([prompts[index] for index in indices], batch_size)
            metrics.update({f"{name}/{key}": value for key, value in found.items()})
        return metrics

    def _calibrate_own(self, prompts: list[str], batch_size: int) -> dict[str, float]:
        if not self.objective.needs_calibration:
            return {}
        projectors = self.objective.projectors
        if projectors.kind == "select":
            student = gathered(self.student.get_input_embeddings().weight)
            if copy_select_channels(projectors, student, self.pair.frozen_teacher.input_embedding()):
                return {"select/copied": 1.0}
        return calibrate_projectors(projectors, self._calibration_rows, prompts, batch_size, self.seed)

    def _calibration_rows(self, prompts: list[str], number: int) -> tuple[dict, dict, Tensor]:
        # Seeded apart from the training rollouts (which derive theirs from the step), never from the global RNG.
        roll = self.sample(prompts, self.rollout, seed=self.seed * 7919 + number)
        student, teacher = self.states(roll, head=False)
        return student, teacher, roll.response_mask.bool()


def check_teachers(teachers: Mapping[str, TeacherConfig], rollout: RolloutConfig) -> None:
    """What several teachers cannot do yet, and names they cannot take, before anything loads."""
    if DEFAULT_TEACHER in teachers:
        raise ValueError(
            f"model.teachers.{DEFAULT_TEACHER}: `{DEFAULT_TEACHER}` names model.teacher; name this teacher otherwise."
        )
    for name in teachers:
        if not name or "/" in name:
            raise ValueError(f"model.teachers: {name!r} cannot name a teacher (metrics are `train/<name>/...`).")
    if teachers and rollout.seq_kd:
        raise ValueError(
            "rollout.seq_kd samples off-policy responses from the teacher, and with model.teachers there are several: "
            "use the data's `response` (seq_kd: false), or one teacher."
        )


def _named_replicas(placement: TeacherPlacement, name: str) -> TeacherPlacement:
    """A remote teacher of `model.teachers` under its own actor names (`oprd-teacher-<name>`) unless it names them."""
    remote = placement.remote
    if remote is None or remote.name != RemoteTeacherConfig.name:
        return placement
    return dataclasses.replace(placement, remote=dataclasses.replace(remote, name=f"{remote.name}-{name}"))
