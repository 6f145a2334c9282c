"""The distillation methods and teacher/student pairs the step and quality benchmarks compare.

A *method* is a set of `DistillModule` arguments (OPRD, OPD with its estimators, the mix); a *pair* names a teacher
and a student. Both built-in SmolLM2 pairs are here, plus tiny random stand-ins that make `--models tiny` runs
finish in seconds (the same code path as the real models, which take minutes on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from oprd.losses.token import TokenLossConfig
from oprd.models import TINY_STUDENT, TINY_TEACHER, ModelSpec
from oprd.models.depth import DepthPrune
from oprd.models.lora import frozen_base_keys
from oprd.models.width import WidthPrune
from oprd.module import DistillModule
from oprd.objective.objective import ObjectiveConfig
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig

EXACT = {"objective": "reverse_kl", "estimator": "exact"}
TOP16 = {"objective": "reverse_kl", "estimator": "topk_sg", "top_k": 16}
METHODS: dict[str, dict[str, Any]] = {
    # OPRD: hidden states only; the teacher stops after its deepest mapped layer (no final norm, no LM head).
    "oprd": {"hidden_weight": 1.0, "token_loss": None},
    # OPD, exact reverse KL over the full vocabulary, LM head in chunks of 1024 tokens (oprd's default).
    "opd": {"hidden_weight": 0.0, "token_loss": EXACT},
    # The same loss with full [b, t, v] logits (chunk_size 0: the reference path).
    "opd_dense": {"hidden_weight": 0.0, "token_loss": {**EXACT, "chunk_size": 0}},
    # OPD top-16, stop-gradient estimator (the OPRD paper's logit baseline), chunked.
    "opd_top16": {"hidden_weight": 0.0, "token_loss": TOP16},
    "opd_top16_dense": {"hidden_weight": 0.0, "token_loss": {**TOP16, "chunk_size": 0}},
    # OPRD Eq. 7: reverse KL + hidden MSE, the hidden term rescaled to the KL's magnitude (configs/mix.yaml).
    "mix": {"hidden_weight": 1.0, "token_weight": 1.0, "balance": True, "token_loss": EXACT},
    # Logit KD: the exact forward KL (configs/compress.yaml's objective after its warm start), chunked.
    "kd": {"hidden_weight": 0.0, "token_loss": {"objective": "forward_kl", "estimator": "exact"}},
}


PAIRS = ("arith", "pruned", "compress")


@dataclass(frozen=True)
class Pair:
    """A teacher and the student that learns from it."""

    name: str
    """`arith` (task-specialised teacher -> plain student), `pruned` (teacher -> its every-other-layer copy) or
    `compress` (the arithmetic teacher -> its depth- and width-pruned copy, configs/compress.yaml's student)."""
    teacher: ModelSpec
    """The frozen teacher."""
    student: ModelSpec
    """The student (`keep_every=2` for the pruned copy, which `DistillModule` builds from the teacher's weights)."""
    tokenizer: str | None = None
    """Tokenizer alias (`tiny` for random models); None: the models' own."""
    layer_map: str = "uniform"
    """`pruned` for a depth-pruned student."""
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `DistillModule` arguments of the pair (the prompt length of the tiny models)."""


def make_pair(name: str, models: str = "smollm2", dtype: str = "float32") -> Pair:
    """The `arith`, `pruned` or `compress` pair on the built-in SmolLM2 models (`smollm2`) or on tiny random ones
    (`tiny`)."""
    if name not in PAIRS:
        raise ValueError(f"Unknown pair {name!r}; choose {', '.join(PAIRS)}.")
    if models == "tiny":
        teacher = ModelSpec(config=TINY_TEACHER, seed=1)
        student = ModelSpec(config=TINY_STUDENT, seed=2)
        tokenizer, extra = "tiny", {"max_prompt_length": 64}
    elif models == "smollm2":
        base = ModelSpec(path="smollm2-135m-instruct", dtype=dtype)
        teacher = ModelSpec(path="smollm2-135m-instruct-arith", dtype=dtype) if name != "pruned" else base
        student, tokenizer, extra = base, None, {}
    else:
        raise ValueError(f"Unknown models {models!r}; choose smollm2 or tiny.")
    if name == "pruned":
        # The teacher's every other layer; student layer i stands in for teacher layers 2i and 2i + 1 and learns the
        # output of the block's last one (`layer_map: pruned`, see oprd.models.prune.pruned_layer_map).
        student = replace(teacher, keep_every=2)
    if name == "compress":  # configs/compress.yaml's student: 20 layers by block influence, then 2/3 of the width
        tiny = models == "tiny"
        depth = DepthPrune(num_layers=2 if tiny else 20)
        width = WidthPrune(hidden_size=48 if tiny else 384, num_attention_heads=4 if tiny else 6,
                           intermediate_size=96 if tiny else 1024)  # fmt: skip
        student = replace(teacher, depth=depth, width=width)
    layer_map = "uniform" if name == "arith" else "pruned"
    return Pair(name, teacher, student, tokenizer=tokenizer, layer_map=layer_map, module_kwargs=extra)


def build_module(
    pair: Pair,
    method: str,
    rollout: RolloutConfig,
    optim: OptimConfig = OptimConfig(),
    seed: int = 0,
    **overrides: Any,
) -> DistillModule:
    """A `DistillModule` for `method` on `pair` (`overrides`: other `DistillModule` arguments)."""
    spec = dict(METHODS[method])
    if spec.get("token_loss") is not None:
        spec["token_loss"] = TokenLossConfig(**spec["token_loss"])
    return DistillModule(
        teacher=pair.teacher,
        student=pair.student,
        tokenizer=pair.tokenizer,
        objective=ObjectiveConfig(layer_map=pair.layer_map, **spec),
        rollout=rollout,
        optim=optim,
        seed=seed,
        **{**pair.module_kwargs, **overrides},
    )


def share_models(module: DistillModule, reference: DistillModule) -> DistillModule:
    """Make `module` use `reference`'s teacher and student (same weights, one copy in memory).

    Each module froze what its own loss cannot reach (`module.distiller.frozen`); call `activate` before using the
    shared student through `module`.
    """
    module.student = module.pair.student = reference.student
    module.pair.frozen_teacher = reference.pair.frozen_teacher
    return module


def activate(module: DistillModule) -> None:
    """Give the (possibly shared) student the trainable set of `module`'s own loss: all but its `distiller.frozen`
    (and, for a LoRA student, all but the adapters)."""
    frozen = set(module.distiller.frozen) | frozen_base_keys(module.student)
    for name, param in module.student.named_parameters():
        param.requires_grad_(name not in frozen)
