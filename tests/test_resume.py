"""Runs started from a checkpoint honour the flags they are given; a stopped or repeated run never loses a state.

Every run is `oprd fit` / `validate` / `predict` on the tiny config, in process.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from oprd.cli import main
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tiny.yaml")


def run(command: str, root: Path, *flags: str) -> None:
    """`oprd <command>` on the tiny config, logs and checkpoints under `root`, no progress bar."""
    main([
        command, "--config", TINY, "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.version", command,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *flags,
    ])  # fmt: skip


def fit(root: Path, *flags: str) -> Path:
    run("fit", root, "--trainer.limit_val_batches", "0", *flags)
    return root / "checkpoints/last.ckpt"


def logged(root: Path, command: str) -> list[dict[str, str]]:
    return list(csv.DictReader((root / command / "metrics.csv").open()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`last.ckpt` of a 3-step tiny run at a constant learning rate of 3e-3."""
    root = tmp_path_factory.mktemp("trained")
    constant = ("--model.optim.schedule", "constant", "--model.optim.warmup_steps", "0")
    return fit(root, "--trainer.max_steps", "3", *constant)


def test_validate_from_a_checkpoint_scores_the_model_it_is_told_to(trained, tmp_path):
    run("validate", tmp_path / "teacher", "--ckpt_path", str(trained), "--model.eval_model", "teacher")
    run("validate", tmp_path / "student", "--ckpt_path", str(trained))
    (teacher,) = logged(tmp_path / "teacher", "validate")
    (student,) = logged(tmp_path / "student", "validate")
    assert float(teacher["val/reverse_kl"]) == 0.0 and not teacher.get("val/hidden")  # the teacher, not the student
    assert float(student["val/reverse_kl"]) > 0 and float(student["val/hidden"]) > 0


def test_a_resumed_run_takes_the_learning_rate_it_is_given(trained, tmp_path):
    resumed = tmp_path / "run"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints/last.ckpt").write_bytes(trained.read_bytes())
    for ckpt_path in ("last", str(resumed / "checkpoints/last.ckpt")):  # Lightning's name and a file path
        steps = 4 if ckpt_path == "last" else 5
        fit(resumed, "--ckpt_path", ckpt_path, "--trainer.max_steps", str(steps), "--model.optim.lr", "1e-4",
            "--model.optim.projector_lr", "2e-4", "--model.optim.schedule", "constant")  # fmt: skip
        checkpoint = torch.load(resumed / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        student, projectors = checkpoint["optimizer_states"][0]["param_groups"]
        assert checkpoint["global_step"] == steps
        assert student["lr"] == student["initial_lr"] == 1e-4 and projectors["lr"] == 2e-4
        assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-4, 2e-4]


@pytest.fixture(scope="module")
def last_layer(tmp_path_factory) -> Path:
    """`last.ckpt` of a 1-step tiny run with `layer_map: last` (one pair, 1_3)."""
    return fit(tmp_path_factory.mktemp("last-layer"), "--trainer.max_steps", "1", "--model.layer_map", "last")


def test_a_checkpoint_fixes_models_and_layer_map(last_layer, tmp_path, capsys, no_weight_loading):
    with pytest.raises(SystemExit) as exit_info:
        run("validate", tmp_path, "--ckpt_path", str(last_layer), "--model.layer_map", "[[0, 1]]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was trained with model.layer_map = 'last', but this run sets [[0, 1]]" in err


def test_layer_map_is_taken_from_the_checkpoint_when_not_given(last_layer, tmp_path):
    run("validate", tmp_path, "--ckpt_path", str(last_layer))  # the config says `uniform`, the default
    (row,) = logged(tmp_path, "validate")
    assert row.get("val/cos/1_3") and not row.get("val/cos/0_0")


def test_a_diverged_run_saves_weights_that_evaluate_and_resume(tmp_path, capsys):
    huge = ("--model.optim.lr", "1e3", "--model.optim.projector_lr", "1e3", "--model.optim.warmup_steps", "0")
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--trainer.max_steps", "8", *huge)
    assert exit_info.value.code == 1
    assert "is not finite. Saved the last weights whose loss and gradients were finite" in capsys.readouterr().err
    (saved,) = tmp_path.glob("nonfinite-step*-last-good.ckpt")
    state = torch.load(saved, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in state.values())
    run("validate", tmp_path / "eval", "--ckpt_path", str(saved))
    (row,) = logged(tmp_path / "eval", "validate")
    assert all(math.isfinite(float(row[k])) for k in ("val/reverse_kl", "val/hidden"))
    fit(tmp_path / "resumed", "--ckpt_path", str(saved), "--trainer.max_steps", "4", "--model.optim.lr", "1e-3")
    losses = [float(r["train/loss"]) for r in logged(tmp_path / "resumed", "fit") if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_skipping_stops_when_every_step_is_broken(tmp_path, capsys):
    flags = ("--model.optim.lr", "1e3", "--model.optim.projector_lr", "1e3", "--model.optim.warmup_steps", "0")
    with pytest.raises(SystemExit):
        skip = ("--model.nonfinite", "skip", "--model.nonfinite_max_skips", "3")
        fit(tmp_path, "--trainer.max_steps", "30", *flags, *skip)
    assert "3 steps in a row were not finite (model.nonfinite_max_skips)" in capsys.readouterr().err
    assert list(tmp_path.glob("nonfinite-step*-last-good.ckpt"))


def test_a_second_fit_in_the_same_folder_takes_over_last_ckpt(tmp_path):
    fit(tmp_path, "--trainer.max_steps", "2")
    fit(tmp_path, "--trainer.max_steps", "3")
    folder = tmp_path / "checkpoints"
    assert not list(folder.glob("last-v*.ckpt"))
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    (earlier,) = folder.glob("earlier-run-*.ckpt")
    assert torch.load(earlier, weights_only=True)["global_step"] == 2


def test_predict_writes_its_responses_and_says_where(tmp_path, capsys):
    run("predict", tmp_path, "--data.max_val_prompts", "4")
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(row) == {"prompt", "response"} for row in rows)
    assert rows[0]["prompt"].startswith("What is ")
    assert f"oprd: Wrote 4 responses to {tmp_path / 'predictions.jsonl'}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_held_out_prompts_is_an_error(command, tmp_path, capsys, no_weight_loading):
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    with pytest.raises(SystemExit) as exit_info:
        run(command, tmp_path, "--data.train", str(prompts))
    assert exit_info.value.code == 2
    assert f"oprd {command} answers held-out prompts, and there are none: set --data.val" in capsys.readouterr().err
