"""The grouped model settings, without any model: each group checks itself, is rebuilt from the plain dicts a
checkpoint holds, and names a setting as the CLI spells it; keys of the flat layout name their new place."""

from __future__ import annotations

import dataclasses
import inspect
import io
import math

import pytest
import torch

from oprd.distiller import EvalConfig
from oprd.hparams import MODEL_CONFIGS, MOVED, from_plain, to_plain, typed_model_args
from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.module import DistillModule
from oprd.objective.bridge import BridgeConfig
from oprd.objective.objective import ObjectiveConfig
from oprd.parallel.placement import TeacherPlacement
from oprd.parallel.remote import RemoteTeacherConfig
from oprd.training.guard import GuardConfig
from tests.helpers import make_module


def test_every_group_is_a_module_argument_whose_default_is_its_dataclass():
    parameters = inspect.signature(DistillModule.__init__).parameters
    for name, cls in MODEL_CONFIGS.items():
        default = parameters[name].default
        assert parameters[name].annotation in (cls.__name__, cls), name
        assert default is inspect.Parameter.empty or isinstance(default, cls), name


def test_a_group_round_trips_through_the_plain_dicts_a_checkpoint_holds():
    objective = ObjectiveConfig(
        layer_map=[[0, 1], ["norm", "norm"]],
        projector="bridge",
        bridge=BridgeConfig(rank=4),
        hidden_loss=HiddenLossConfig(kind="normalized_mse"),
        token_loss=TokenLossConfig(objective="forward_kl"),
        balance=True,
    )
    plain = to_plain({"objective": objective, "eval": EvalConfig(samples=2)})
    torch.save(plain, buffer := io.BytesIO())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain values only: a safe load reads them
    rebuilt = typed_model_args(loaded)
    assert rebuilt["objective"] == objective and rebuilt["eval"] == EvalConfig(samples=2)
    assert isinstance(rebuilt["objective"].bridge, BridgeConfig)
    assert isinstance(rebuilt["objective"].token_loss, TokenLossConfig)


def test_a_dict_inside_a_group_is_built_into_its_dataclass():
    placement = from_plain(TeacherPlacement, {"remote": {"replicas": 3}}, "model.teacher_placement")
    assert placement.remote == RemoteTeacherConfig(replicas=3)
    assert from_plain(ObjectiveConfig, {"token_loss": None, "hidden_weight": 2.0}).token_loss is None


@pytest.mark.parametrize(
    ("group", "value", "message"),
    [
        ("objective", {"hidden_weight": -1.0}, "model.objective.hidden_weight must be >= 0 and finite, got -1.0"),
        ("objective", {"token_weight": math.nan}, "model.objective.token_weight must be >= 0 and finite, got nan"),
        ("objective", {"hidden_weight": 0.0}, "model.objective.hidden_weight 0 with no token_loss leaves nothing"),
        ("objective", {"balance": True}, "model.objective.balance true .* there is no token term"),
        ("objective", {"bridge": {"rank": 0}}, r"model.objective.bridge.rank must be >= 1"),
        ("objective", {"warm_start": {"steps": 0}}, r"model.objective.warm_start.steps must be >= 1, got 0"),
        ("objective", {"warm_start": {"steps": 5, "hidden_weight": 0}}, "model.objective.warm_start.hidden_weight and"),
        ("objective", {"warm_start": {"steps": 5, "token_weight": 1}}, "model.objective.warm_start.token_weight > 0"),
        ("objective", {"hidden_loss": {"kind": "mse", "k": 0}}, r"model.objective.hidden_loss.k must be at least 1"),
        ("objective", {"token_loss": {"beta": 2}}, r"model.objective.token_loss.beta must lie in \[0, 1\]"),
        ("eval", {"max_new_tokens": 0}, "model.eval.max_new_tokens must be >= 1"),
        ("eval", {"samples": -1}, "model.eval.samples must be >= 0"),
        ("eval", {"samples": 4, "top_p": 0}, r"model.eval.top_p must lie in \(0, 1\]"),
        ("guard", {"max_skips": 0}, "model.guard.max_skips must be >= 1, got 0"),
        ("teacher_placement", {"device": "cpu", "offload": True}, "model.teacher_placement.device and offload"),
        ("teacher_placement", {"remote": {"replicas": 0}}, "model.teacher_placement.remote.replicas must be >= 1"),
        ("teacher_placement", {"remote": {"address": "x"}}, "model.teacher_placement.remote.address 'x' is not"),
    ],
)
def test_a_bad_setting_is_named_as_the_cli_spells_it(group, value, message):
    with pytest.raises(ValueError, match=message):
        typed_model_args({group: value})


def test_sampling_settings_are_checked_only_when_held_out_answers_are_sampled():
    assert EvalConfig(temperature=0.0, top_p=0.0).samples == 0  # greedy scoring never reads them
    with pytest.raises(ValueError, match="temperature must be > 0"):
        EvalConfig(samples=2, temperature=0.0)


def test_every_key_of_the_flat_layout_names_a_setting_that_exists():
    for old, new in MOVED.items():
        group, field = new.split(".")
        assert field in {f.name for f in dataclasses.fields(MODEL_CONFIGS[group])}, old
    with pytest.raises(ValueError, match="model.hidden_weight is now model.objective.hidden_weight"):
        typed_model_args({"hidden_weight": 1.0})
    with pytest.raises(ValueError, match="model.nonfinite_max_skips is now model.guard.max_skips"):
        typed_model_args({"nonfinite_max_skips": 3})


def test_each_group_reaches_the_part_it_configures():
    module = make_module(
        guard={"nonfinite": "skip", "max_skips": 2, "keep_last_good": False},
        eval=EvalConfig(max_new_tokens=5, samples=3),
        objective={"hidden_weight": 2.0, "token_loss": {"objective": "forward_kl"}},
    )
    guard = module.guard
    assert (guard.mode, guard.max_skips, guard.keep_last_good) == ("skip", 2, False)
    assert module.distiller.evaluation == EvalConfig(max_new_tokens=5, samples=3)
    assert module.objective.hidden_weight == 2.0 and module.objective.token_loss.objective == "forward_kl"
    assert module.hparams["guard"] == to_plain(GuardConfig(nonfinite="skip", max_skips=2, keep_last_good=False))
