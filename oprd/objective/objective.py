"""The distillation objective: what the student is trained against, and everything learned besides the student.

Shape legend:
    b    sequences (prompts x generations)
    t    prompt + response tokens
    d_s  student width
    d_t  teacher width

`L = w_token * L_token + mu * L_hidden` (OPRD, arXiv 2606.06021, Eq. 7). The `Objective` owns the projectors, says
which capture points each model's pass must produce and whether the LM heads are needed (nothing else re-derives
that from the config), and returns a `LossTerms` of token sums that knows its own metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from oprd.losses.hidden import HiddenLossConfig, hidden_loss_sums, mean_cosine, select_positions
from oprd.losses.lm_head import Head, sampled_logprobs, token_loss_sum_from_hidden
from oprd.losses.token import TokenLossConfig
from oprd.losses.weighting import LayerWeighting
from oprd.models.capture import NORM, Point
from oprd.models.heads import check_head_reproducible, check_same_logit_transforms, model_logit_transforms
from oprd.objective.bridge import BridgeConfig, BridgeProjectors, check_rank
from oprd.objective.layer_map import LayerMapSpec, resolve_layer_map
from oprd.objective.projectors import Projectors
from oprd.objective.select import SelectProjectors
from oprd.objective.statistics import RunningMoments
from oprd.rollout.sampling import Rollout

Projector = Literal["linear", "bridge", "select"]
EVAL_KL = TokenLossConfig(objective="reverse_kl", estimator="exact")
"""Held-out reverse KL is always exact over the full vocabulary, whatever the training objective."""


def with_model_logit_transforms(config: TokenLossConfig | None, model_config) -> TokenLossConfig | None:
    """Fill in the model family's own logit scale and soft cap (see `HEAD_RULES`) where the loss config leaves them
    unset, so the chunked path optimises what the model's forward computes. Returns a new config; the caller's is
    never mutated."""
    if config is None:
        return None
    scale, cap = model_logit_transforms(model_config)
    updates = {}
    if config.logit_softcap is None and cap:
        updates["logit_softcap"] = cap
    if config.logit_scale is None and scale:
        updates["logit_scale"] = scale
    return dataclasses.replace(config, **updates) if updates else config


def check_weights(config: ObjectiveConfig | WarmStartWeights) -> None:
    """`config.hidden_weight` and `config.token_weight` are >= 0 and finite."""
    for name in ("hidden_weight", "token_weight"):
        value = getattr(config, name)
        # Written so that NaN fails too (YAML reads `.nan` and `.inf` as floats); a NaN weight makes every loss NaN.
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be >= 0 and finite, got {value}.")


@dataclass(frozen=True)
class WarmStartWeights:
    """The objective's weights for the first `steps` optimizer steps (`model.objective.warm_start`), e.g. the hidden
    term alone while the rollout trains on the data's reference answers (`rollout.lmbda_start: 0` for `lmbda_steps`)."""

    steps: int
    """How many optimizer steps (from step 0) take these weights; the objective's own weights from then on."""
    hidden_weight: float = 1.0
    """mu in those steps."""
    token_weight: float = 0.0
    """The token-space term's weight in those steps."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        check_weights(self)
        if self.hidden_weight == 0 and self.token_weight == 0:
            raise ValueError("hidden_weight and token_weight are both 0: nothing to optimise in the warm start.")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the student is trained against (`model.objective`; see `Objective`)."""

    layer_map: LayerMapSpec = "uniform"
    """`uniform`, `all`, `last`, `norm`, `pruned`, `pruned_norm` (`oprd.objective.layer_map`), or explicit
    `[[student, teacher], ...]` pairs."""
    projector: Projector = "linear"
    """`linear` (a trained `Linear(d_S, d_T)` per pair, identity for equal widths), `bridge` (OPRD-Bridge: a frozen
    rank-r PCA basis of the teacher's states, calibrated; for different widths) or `select` (no parameters: each
    student channel against the teacher channel it matches best, calibrated; for a student no wider than its
    teacher, e.g. a width-pruned copy)."""
    bridge: BridgeConfig = BridgeConfig()
    """The Bridge's rank and calibration (its `rows`, `batches` and `holdout` also calibrate `select`)."""
    hidden_loss: HiddenLossConfig = HiddenLossConfig()
    """How hidden states are compared."""
    hidden_weight: float = 1.0
    """mu, the weight of the hidden-state term (0 turns it off: pure token-space distillation)."""
    token_loss: TokenLossConfig | None = None
    """The token-space (logit) term on the same rollout and teacher pass; None turns it off."""
    token_weight: float = 1.0
    """The weight of the token-space term."""
    balance: bool = False
    """Rescale the hidden term to the token term's magnitude (a detached ratio) before weighting."""
    warm_start: WarmStartWeights | None = None
    """Other weights for the first `warm_start.steps` optimizer steps (a function of the step alone, so every rank
    and a resumed run agree); None: `hidden_weight` and `token_weight` throughout. Every configured term is computed
    and logged in every step, the one weighted 0 too."""

    def __post_init__(self) -> None:
        check_weights(self)
        if self.hidden_weight == 0 and self.token_loss is None:
            raise ValueError(
                "hidden_weight 0 with no token_loss leaves nothing to optimise: set hidden_weight > 0, or a "
                "token_loss (e.g. --config opd.yaml)."
            )
        if self.balance and self.token_loss is None:
            raise ValueError(
                "balance true rescales the hidden term to the token term, and there is no token term: set "
                "model.objective.token_loss (e.g. {objective: reverse_kl}), or drop model.objective.balance."
            )
        if self.warm_start is not None and self.warm_start.token_weight > 0 and self.token_loss is None:
            raise ValueError(
                "model.objective.warm_start.token_weight > 0 weights a token term, and there is none: set "
                "model.objective.token_loss (e.g. {objective: forward_kl}), or warm_start.token_weight 0."
            )


@dataclass(frozen=True)
class Heads:
    """The two output heads a token-space term reads (the teacher's already on the student's device)."""

    student: Head
    teacher: Head


@dataclass
class LossTerms:
    """One micro-batch's terms, each a sum over its `tokens` (divide by the step's count of them).

    `metrics(tokens)` turns them into per-token values under the names oprd logs.
    """

    loss: Tensor
    """What backward sees: `token_weight * token + hidden_weight * hidden`."""
    hidden: Tensor
    """Hidden-state term, mean over pairs (0 without pairs)."""
    pairs: dict[str, Tensor] = field(default_factory=dict)
    """Hidden-state term of each layer pair, by pair label."""
    cosine: dict[str, Tensor] = field(default_factory=dict)
    """Mean cosine similarity of each pair's projected student state to the teacher's (already a mean)."""
    token: Tensor | None = None
    """Token-space term, when one is computed."""
    hidden_weight: Tensor | float = 1.0
    """The hidden term's effective weight (mu, times the balance ratio when balancing)."""
    token_weight: float = 1.0
    """The token term's weight."""
    rollout_logprob_gap: Tensor | None = None
    """Mean |engine log-prob - the student's own| of the sampled tokens, for engines that report them."""
    tokens: Tensor | None = None
    """How many tokens the sums are over: the response tokens, or, with a hidden term alone, the tokens its
    `positions` select. The step divides its gradient by this count summed over micro-batches and ranks."""
    by_teacher: dict[str, LossTerms] = field(default_factory=dict)
    """With several teachers: each teacher's own terms, on the rows routed to it (`merged`)."""

    @classmethod
    def merged(cls, parts: dict[str, LossTerms]) -> LossTerms:
        """Several teachers' terms of one micro-batch as one: each is a sum over its own rows' tokens, so the sums
        and the token counts add; the layer pairs, cosines and weights stay with each teacher (`by_teacher`)."""
        terms = list(parts.values())
        tokens = [part.token for part in terms if part.token is not None]
        gaps = [part.rollout_logprob_gap for part in terms if part.rollout_logprob_gap is not None]
        return cls(
            loss=sum(part.loss for part in terms),
            hidden=sum(part.hidden for part in terms),
            token=sum(tokens) if tokens else None,
            rollout_logprob_gap=sum(gaps) / len(gaps) if gaps else None,
            tokens=sum(part.tokens for part in terms),
            by_teacher=dict(parts),
        )

    def metrics(self, tokens: Tensor | None = None) -> dict[str, Tensor]:
        """Per-token values: `loss`, `hidden`, `hidden/<pair>`, `cos/<pair>`, `hidden_weight`, and with a token term
        `token_kl` and `token_weight`. Merged terms of several teachers: `loss`, `hidden` and `token_kl` over all
        rows, and each teacher's own metrics as `<teacher>/<metric>`.

        Args:
            tokens: the count the sums are over (clamped to at least 1); default `self.tokens`.
        """
        tokens = (self.tokens if tokens is None else tokens).clamp_min(1).float()
        metrics = {"loss": self.loss.detach() / tokens, "hidden": self.hidden.detach() / tokens}
        if self.by_teacher:
            if self.token is not None:
                metrics["token_kl"] = self.token.detach() / tokens
            for name, part in self.by_teacher.items():
                metrics.update({f"{name}/{key}": value for key, value in part.metrics().items()})
            return metrics
        metrics.update({f"hidden/{label}": value.detach() / tokens for label, value in self.pairs.items()})
        metrics.update({f"cos/{label}": value for label, value in self.cosine.items()})
        metrics["hidden_weight"] = torch.as_tensor(self.hidden_weight).detach().float()
        if self.token is not None:
            metrics["token_kl"] = self.token.detach() / tokens
            metrics["token_weight"] = torch.tensor(float(self.token_weight))
        if self.rollout_logprob_gap is not None:
            metrics["rollout_logprob_gap"] = self.rollout_logprob_gap
        return metrics

    def named(self) -> dict[str, Tensor]:
        """Every computed term by name: `hidden/<pair>`, `hidden`, `token` (when computed) and `loss`; merged terms of
        several teachers name each teacher's as `<teacher>/<term>`."""
        parts = self.by_teacher.items()
        named = {f"{name}/{key}": value for name, part in parts for key, value in part.named().items()}
        named.update({f"hidden/{label}": value for label, value in self.pairs.items()})
        named["hidden"] = self.hidden
        if self.token is not None:
            named["token"] = self.token
        named["loss"] = self.loss
        return named


class Objective(nn.Module):
    """Projectors plus the hidden-state and token-space terms and their weighting.

    Args:
        pairs: the resolved layer map, `(student point, teacher point)`.
        student_config: the student's transformers config (width, logit soft-cap / scale).
        teacher_config: the teacher's transformers config (width).
        vocab_size: the shared tokenizer's vocabulary (padded head rows are sliced off).
        hidden_loss: how hidden states are compared.
        hidden_weight: mu; 0 turns the hidden term off (no pairs, no projectors).
        token_loss: the token-space term; None turns it off.
        token_weight: w_token.
        balance: rescale the hidden term to the token term's magnitude (a detached ratio) before mu weights it.
        seed: seed of the projectors' initialisation (random between unequal widths).
        projector: `linear` (`Linear(d_S, d_T)` per pair, trained), `bridge` (a calibrated shared subspace) or
            `select` (parameter-free: each student channel against one teacher channel, matched by calibration).
        bridge: the Bridge's calibration settings (its collection settings also serve `select`).
        warm_start: other weights for the first optimizer steps (`weights_at`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Point, Point]],
        student_config,
        teacher_config,
        vocab_size: int,
        hidden_loss: HiddenLossConfig = HiddenLossConfig(),
        hidden_weight: float = 1.0,
        token_loss: TokenLossConfig | None = None,
        token_weight: float = 1.0,
        balance: bool = False,
        seed: int = 0,
        projector: Projector = "linear",
        bridge: BridgeConfig = BridgeConfig(),
        warm_start: WarmStartWeights | None = None,
    ) -> None:
        super().__init__()
        if hidden_weight <= 0 and token_loss is None:
            raise ValueError("Nothing to optimise: set hidden_weight > 0, or a token_loss.")
        # Held-out scoring reads both LM heads whatever the objective: each must be reproducible from its final state.
        check_head_reproducible(student_config)
        check_head_reproducible(teacher_config)
        check_same_logit_transforms(student_config, teacher_config)
        self.warm_start = warm_start
        hidden = hidden_weight > 0 or (warm_start is not None and warm_start.hidden_weight > 0)
        self.pairs = list(pairs) if hidden else []
        self.hidden_loss, self.hidden_weight = hidden_loss, hidden_weight
        self.token_loss = with_model_logit_transforms(token_loss, student_config)
        self.eval_kl = with_model_logit_transforms(EVAL_KL, student_config)
        self.token_weight, self.balance, self.vocab_size = token_weight, balance, vocab_size
        widths = (student_config.hidden_size, teacher_config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # projectors between unequal widths start random: make that reproducible
            if projector == "bridge":
                check_rank(bridge, teacher_config.hidden_size)
                self.projectors = BridgeProjectors(self.pairs, *widths, bridge)
            elif projector == "select":
                self.projectors = SelectProjectors(self.pairs, *widths, bridge)
            else:
                self.projectors = Projectors(self.pairs, *widths)
        self.layer_weighting = LayerWeighting(hidden_loss.layer_weights, len(self.pairs))
        self.moments = None
        if hidden_loss.kind == "standardized_mse":
            width = {"bridge": bridge.rank, "select": widths[0]}.get(projector, widths[1])
            self.moments = nn.ModuleDict({label: RunningMoments(width) for label in self.projectors.labels})

    @classmethod
    def from_config(
        cls, config: ObjectiveConfig, student_config, teacher_config, vocab_size: int, kept: list[int] | None, seed: int
    ) -> Objective:
        """The objective `config` describes, its layer map resolved on the two models' depths (`kept`: the teacher
        layers a depth-pruned student kept, for `layer_map: pruned`)."""
        depths = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        pairs = resolve_layer_map(config.layer_map, *depths, kept)
        settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
        del settings["layer_map"]
        return cls(pairs, student_config, teacher_config, vocab_size, seed=seed, **settings)

    def weights_at(self, step: int | None) -> tuple[float, float]:
        """`(hidden_weight, token_weight)` of optimizer step `step` (0-based): the warm start's in its first steps, the
        objective's own after them and when `step` is None (held-out scoring)."""
        if step is not None and self.warm_start is not None and step < self.warm_start.steps:
            return self.warm_start.hidden_weight, self.warm_start.token_weight
        return self.hidden_weight, self.token_weight

    @property
    def needs_calibration(self) -> bool:
        """Whether calibrated projectors (the Bridge's subspaces, `select`'s channels) are still to be fitted (before
        the first training step)."""
        calibrated = getattr(self.projectors, "calibrated", None)
        return calibrated is not None and bool(self.pairs) and not bool(calibrated)

    @property
    def needs_head(self) -> bool:
        """Whether training reads the LM heads (a token-space term): the `norm` point and the heads are needed."""
        return self.token_loss is not None

    def teacher_projection(self) -> dict[str, tuple[Point, Tensor, Tensor]] | None:
        """The calibrated Bridge's teacher side (pair label -> teacher point, mean, basis), for a remote teacher to
        apply where the states are and send `r` numbers per token and pair instead of `d_t`; None otherwise."""
        projection = getattr(self.projectors, "teacher_projection", None)
        if projection is None or not self.pairs or self.needs_calibration:
            return None
        return projection()

    def sent_whole(self, projection: dict | None) -> list[Point]:
        """The teacher points a remote teacher sends as whole states: with the Bridge's `projection`, only the final
        normed state a token term reads (the pairs travel as coordinates); without one, every teacher point."""
        return ([NORM] if self.needs_head else []) if projection else self.points("teacher")

    def points(self, who: Literal["student", "teacher"], head: bool | None = None) -> list[Point]:
        """The capture points `who`'s pass must produce; `head` (default: `needs_head`) adds the final normed state."""
        side = 0 if who == "student" else 1
        head = self.needs_head if head is None else head
        return [pair[side] for pair in self.pairs] + ([NORM] if head else [])

    def forward(
        self,
        student: dict[Point, Tensor],
        teacher: dict[Point, Tensor],
        roll: Rollout,
        heads: Heads | None = None,
        token_loss: TokenLossConfig | None = None,
        targets: dict[str, Tensor] | None = None,
        step: int | None = None,
    ) -> LossTerms:
        """Every term on one rollout.

        Args:
            student: capture point -> `[b, t, d_s]` student states (with gradient when training).
            teacher: capture point -> `[b, t, d_t]` teacher states.
            roll: the rollout (response mask, and the sampled tokens for a token term).
            heads: the output heads, needed with a token term.
            token_loss: the token term to compute (default: the configured one; `eval_kl` for held-out scoring).
            targets: each pair's teacher target, when the teacher computed it (`teacher_projection`); `teacher`
                then needs no pair's state.
            step: the optimizer step, which picks the weights (`weights_at`).
        """
        token_loss = token_loss or self.token_loss
        hidden_weight, token_weight = self.weights_at(step)
        terms = LossTerms(loss=roll.response_mask.new_zeros((), dtype=torch.float32), hidden=None)
        terms.hidden = terms.loss
        terms.hidden_weight = torch.tensor(float(hidden_weight))
        responses = roll.response_mask.sum()
        selected = select_positions(roll.response_mask, self.hidden_loss.positions, self.hidden_loss.k).sum()
        terms.tokens = responses if token_loss is not None else selected
        if self.pairs:
            projected = self.projectors(student)
            targets = self.projectors.targets(teacher) if targets is None else targets
            stds = None if self.moments is None else self.teacher_stds(targets, roll.response_mask)
            terms.pairs = hidden_loss_sums(projected, targets, roll.response_mask, self.hidden_loss, stds)
            terms.cosine = {
                label: mean_cosine(projected[label], targets[label], roll.response_mask) for label in terms.pairs
            }
            if token_loss is not None and self.hidden_loss.positions != "all":
                # The hidden term is a mean over the tokens it selects, the token term over all response tokens, and
                # one step divides both by one count: restate the hidden sums per response token. Exact within a
                # micro-batch; across micro-batches it weighs each one's hidden mean by its response tokens.
                scale = responses.float() / selected.clamp_min(1).float()
                terms.pairs = {label: value * scale for label, value in terms.pairs.items()}
            sums = torch.stack(list(terms.pairs.values()))
            terms.hidden = self.layer_weighting(sums, terms.tokens)
        terms.loss = hidden_weight * terms.hidden
        if token_loss is not None:
            if heads is None:
                raise ValueError("A token-space term needs the models' output heads.")
            terms.token = self.token_sum(student[NORM], teacher[NORM], roll, heads, token_loss)
            if self.balance and self.pairs:
                ratio = terms.token.detach() / terms.hidden.detach().clamp_min(1e-12)
                terms.hidden_weight = hidden_weight * ratio
            terms.token_weight = token_weight
            terms.loss = token_weight * terms.token + terms.hidden_weight * terms.hidden
        return terms

    def rollout_logprob_gap(self, student_norm: Tensor, roll: Rollout, heads: Heads) -> Tensor:
        """Mean |log p_engine(y_t) - log p_student(y_t)| over the sampled response tokens: zero when the engine samples
        exactly the policy being trained."""
        mask = roll.response_mask[:, 1:]
        own = sampled_logprobs(
            student_norm[:, :-1], heads.student, roll.input_ids[:, 1:], mask, self.eval_kl, self.vocab_size
        )
        return (roll.logprobs[:, 1:][mask.bool()] - own).abs().mean()

    def teacher_stds(self, targets: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Per pair, the teacher's running standard deviation per dimension `[d_t]`, first updated with this batch's
        teacher states when the objective trains (train mode, gradients on): held-out scoring never moves it."""
        if self.training and torch.is_grad_enabled():
            for label, states in targets.items():
                self.moments[label].update(states, mask)
        return {label: self.moments[label].std() for label in targets}

    def token_sum(
        self, student_norm: Tensor, teacher_norm: Tensor, roll: Rollout, heads: Heads, config: TokenLossConfig
    ) -> Tensor:
        """Token-space loss summed over response tokens: position t-1's distribution predicts response token t.

        Args:
            student_norm: `[b, t, d_s]` final normed student states.
            teacher_norm: `[b, t, d_t]` final normed teacher states.
        """
        return token_loss_sum_from_hidden(
            student_norm[:, :-1],
            heads.student,
            teacher_norm[:, :-1],
            heads.teacher,
            roll.input_ids[:, 1:],
            roll.response_mask[:, 1:],
            config,
            self.vocab_size,
        )
