"""The teacher on Ray replicas: the same states, heads, samples and losses as the in-process teacher, on a real local
Ray cluster (no mocks); lost replicas, a replica serving another model, an unreachable cluster."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from oprd.data import PromptDataModule
from oprd.losses.hidden import HiddenLossConfig
from oprd.losses.token import TokenLossConfig
from oprd.models import ModelSpec
from oprd.models.capture import NORM
from oprd.objective.bridge import BridgeConfig
from oprd.parallel.remote import RemoteTeacherConfig, TeacherUnavailable
from oprd.rollout import RolloutConfig
from tests.helpers import ROOT, TEACHER, make_module, trainer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # under xdist: one worker holds the local cluster

PROMPTS = ["What is 2 plus 3?", "Name a colour.", "Count to four."]
NAMES = (f"test-teacher-{os.getpid()}-{i}" for i in itertools.count())
TOKEN = TokenLossConfig(objective="reverse_kl", estimator="exact")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster for the module; logical CPUs so that every replica of every test can be scheduled."""
    ray.init(num_cpus=16, namespace="oprd", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def remote(replicas: int = 2, **kwargs) -> RemoteTeacherConfig:
    return RemoteTeacherConfig(replicas=replicas, name=next(NAMES), threads=torch.get_num_threads(), **kwargs)


def test_remote_states_heads_and_samples_equal_the_in_process_teacher():
    local = make_module(objective={"token_loss": TOKEN})
    away = make_module(objective={"token_loss": TOKEN}, teacher_placement={"remote": remote()})
    assert away.pair.remote and away.pair.frozen_teacher.model is None  # no teacher module in this process
    roll = local.pair.sample(PROMPTS, RolloutConfig(max_new_tokens=8), seed=3)
    points = local.objective.points("teacher", True)
    assert NORM in points  # a token term ships the final normed state: the trainer forms the logits
    start = roll.prompt_length - 1  # the prompt's states stay on the replica: only the positions a term reads come
    assert start > 0
    for _ in range(2):  # both replicas answer in turn
        mine, theirs = local.pair.teacher_states(roll, points), away.pair.teacher_states(roll, points)
        assert mine.keys() == theirs.keys()
        for point in mine:
            assert torch.equal(mine[point][:, start:], theirs[point][:, start:]), point
            assert mine[point].shape == theirs[point].shape and not theirs[point][:, :start].any()
    assert torch.equal(local.pair.heads().teacher.weight, away.pair.heads().teacher.weight)
    config = RolloutConfig(max_new_tokens=8, temperature=1.0)
    a = local.pair.sample(PROMPTS, config, seed=5, model=local.pair.teacher)
    b = away.pair.sample(PROMPTS, config, seed=5, model=away.pair.teacher)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)


def test_with_a_calibrated_bridge_a_replica_sends_the_bridge_coordinates_of_its_states():
    bridge = {"projector": "bridge", "bridge": BridgeConfig(rank=4, batches=1), "token_loss": TOKEN}
    local = make_module(objective=bridge)
    away = make_module(objective=bridge, teacher_placement={"remote": remote(replicas=1)})
    local.distiller.calibrate(PROMPTS, batch_size=3)
    away.objective.load_state_dict(local.objective.state_dict())
    projection = away.objective.teacher_projection()
    assert projection is not None and set(projection) == set(local.objective.projectors.labels)
    roll = local.pair.sample(PROMPTS, RolloutConfig(max_new_tokens=8), seed=3)
    start = roll.prompt_length - 1
    states, targets = away.pair.request_teacher_states(roll, [NORM], projection)()
    expected = local.objective.projectors.targets(local.pair.teacher_states(roll, local.objective.points("teacher")))
    assert set(states) == {NORM} and targets.keys() == expected.keys()  # no pair's d_t states travel
    for label, target in targets.items():
        assert target.shape[-1] == 4 and not target[:, :start].any()
        assert torch.equal(target[:, start:], expected[label][:, start:]), label
    assert make_module(objective=bridge).objective.teacher_projection() is None  # before calibration: whole states


class Losses(L.Callback):
    """Every step's loss, and an optional action before a given step."""

    def __init__(self, before_step: dict | None = None) -> None:
        self.losses, self.before_step = [], before_step or {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        action = self.before_step.get(trainer.global_step)
        if action is not None:
            action(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def fit_losses(tmp_path, steps: int = 3, before_step: dict | None = None, data=None, **kwargs) -> list[float]:
    module = make_module(**kwargs)
    probe = Losses(before_step)
    trainer(tmp_path, max_steps=steps, callbacks=[probe]).fit(module, data or PromptDataModule(batch_size=2))
    return probe.losses


def test_select_on_a_student_pruned_from_a_remote_teacher_compares_the_copied_channels(monkeypatch):
    # The teacher's embedding comes from a replica; the student is the teacher's own weights (seed 1), depth-pruned.
    student = ModelSpec(config=TEACHER, seed=1, keep_layers=[0, 2])
    select = {"projector": "select", "hidden_loss": HiddenLossConfig(kind="mse")}
    away = make_module(student=student, objective=select, teacher_placement={"remote": remote(replicas=1)})
    local = make_module(student=student, objective=select)

    def no_rollouts(*args, **kwargs):
        raise AssertionError("a pruned student's select sampled calibration rollouts")

    monkeypatch.setattr(away.distiller, "sample", no_rollouts)
    assert away.distiller.calibrate(PROMPTS, batch_size=2) == {"select/copied": 1.0}
    embedding = local.pair.teacher.get_input_embeddings().weight
    assert torch.equal(away.pair.frozen_teacher.input_embedding(), embedding)
    assert local.distiller.calibrate(PROMPTS, batch_size=2) == {"select/copied": 1.0}
    for label in local.objective.projectors.labels:
        assert torch.equal(away.objective.projectors.channels(label), local.objective.projectors.channels(label))


@pytest.mark.parametrize(
    "objective",
    [
        {},  # hidden states only
        {"hidden_weight": 0.0, "token_loss": TOKEN},  # token term only: logits formed from the shipped norm state
        {"token_loss": TOKEN, "token_weight": 0.5},  # mixed
        {"projector": "bridge", "bridge": BridgeConfig(rank=4, batches=1)},  # the replica sends the coordinates
    ],
    ids=["hidden", "token", "mixed", "bridge"],
)
def test_a_fit_with_a_remote_teacher_logs_the_in_process_losses(tmp_path, objective):
    local = fit_losses(tmp_path / "local", objective=objective)
    away = fit_losses(tmp_path / "remote", objective=objective, teacher_placement={"remote": remote()})
    assert away == local


def test_two_teachers_one_of_them_remote_log_the_in_process_losses(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": prompt, "teacher": "b" if i % 2 else None} for i, prompt in enumerate(PROMPTS * 2)]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PromptDataModule(train=str(train), batch_size=3)
    b = {"model": {"config": TEACHER, "seed": 3}, "layer_map": "last"}
    token = {"token_loss": TOKEN, "token_weight": 0.5}
    local = fit_losses(tmp_path / "local", data=data, objective=token, teachers={"b": b})
    b_away = {**b, "placement": {"remote": remote(replicas=1)}}
    checked = []

    def b_is_remote(module) -> None:
        checked.append(module.distiller.others["b"].pair.remote and not module.pair.remote)

    away = fit_losses(
        tmp_path / "remote", data=data, before_step={0: b_is_remote}, objective=token, teachers={"b": b_away}
    )
    assert checked == [True] and away == local


def _kill_actor(module) -> None:
    name, handle = module.pair.frozen_teacher.replicas[0]
    ray.kill(handle, no_restart=True)


def _kill_process(module) -> None:
    name, _ = module.pair.frozen_teacher.replicas[0]
    os.kill(module.pair.frozen_teacher.pids[name], signal.SIGKILL)


@pytest.mark.parametrize("kill", [_kill_actor, _kill_process], ids=["actor", "process"])
def test_a_replica_lost_mid_run_leaves_the_losses_unchanged(tmp_path, kill):
    local = fit_losses(tmp_path / "local", steps=4)
    away = fit_losses(tmp_path / "remote", steps=4, before_step={2: kill}, teacher_placement={"remote": remote()})
    assert away == local


def test_with_every_replica_lost_the_run_saves_and_names_the_teacher(tmp_path):
    settings = remote(replicas=1)

    def kill_all(module):
        for _, handle in list(module.pair.frozen_teacher.replicas):
            ray.kill(handle, no_restart=True)

    with pytest.raises(TeacherUnavailable, match=f"{settings.name}.*auto.*teacher-lost-step1.ckpt"):
        fit_losses(tmp_path, steps=3, before_step={1: kill_all}, teacher_placement={"remote": settings})
    saved = torch.load(tmp_path / "teacher-lost-step1.ckpt", weights_only=True)
    assert saved["global_step"] == 1


def test_a_replica_serving_another_model_is_refused():
    settings = remote(replicas=1, detached=True)
    serving = make_module(teacher_placement={"remote": settings})  # teacher seed 1 (conftest), left running: detached
    try:
        again = make_module(teacher_placement={"remote": settings})  # the same model re-attaches to the running replica
        assert again.pair.frozen_teacher.pids == serving.pair.frozen_teacher.pids
        from oprd.models import TINY_TEACHER

        with pytest.raises(ValueError, match=f"{settings.name}-0.*serves another model"):
            make_module(teacher=ModelSpec(config=TINY_TEACHER, seed=5), teacher_placement={"remote": settings})
    finally:
        ray.kill(ray.get_actor(f"{settings.name}-0", namespace="oprd"))


def test_an_unreachable_cluster_fails_in_one_line_before_the_student_loads(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "oprd.cli", "fit", "--config", str(ROOT / "configs/tiny.yaml")]
    command += ["--trainer.default_root_dir", str(tmp_path), "--model.teacher_placement.remote.address", "127.0.0.1:9"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "127.0.0.1:9" in errors[0] and "ray start --head" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["", "nohost", "host:port", "ray://:10001"])
def test_a_malformed_address_is_named_with_its_forms_before_anything_connects(address):
    with pytest.raises(
        ValueError, match=r"model.teacher_placement.remote.address .* is not `auto`, `host:port` or `ray://host:port`"
    ):
        RemoteTeacherConfig(address=address)
