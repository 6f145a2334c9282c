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
from tests.helpers import ROOT

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("resume")

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
    run("validate", tmp_path / "teacher", "--ckpt_path", str(trained), "--model.eval.model", "teacher")
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
    return fit(tmp_path_factory.mktemp("last-layer"), "--trainer.max_steps", "1", "--model.objective.layer_map", "last")


def test_a_checkpoint_fixes_models_and_layer_map(last_layer, tmp_path, capsys, no_weight_loading):
    with pytest.raises(SystemExit) as exit_info:
        run("validate", tmp_path, "--ckpt_path", str(last_layer), "--model.objective.layer_map", "[[0, 1]]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was trained with model.objective.layer_map = 'last', but this run sets [[0, 1]]" in err


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
    rows = [r for r in logged(tmp_path / "resumed", "fit") if r.get("train/loss")]
    assert rows and all(math.isfinite(float(r["train/loss"])) for r in rows)
    step = torch.load(saved, map_location="cpu", weights_only=True)["global_step"]
    assert [int(r["step"]) for r in rows] == list(range(step, 4))  # logged at the steps they are


def test_skipping_stops_when_every_step_is_broken(tmp_path, capsys):
    flags = ("--model.optim.lr", "1e3", "--model.optim.projector_lr", "1e3", "--model.optim.warmup_steps", "0")
    with pytest.raises(SystemExit):
        skip = ("--model.guard.nonfinite", "skip", "--model.guard.max_skips", "3")
        fit(tmp_path, "--trainer.max_steps", "30", *flags, *skip)
    assert "3 steps in a row were not finite (model.guard.max_skips)" in capsys.readouterr().err
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


# ---- `--ckpt_path last` is a path like any other; a new run never loses an earlier one's checkpoint


def copy_of(checkpoint: Path, root: Path) -> Path:
    """`checkpoint` as `root`'s `last.ckpt`, where `--ckpt_path last` looks."""
    (root / "checkpoints").mkdir(parents=True)
    last = root / "checkpoints/last.ckpt"
    last.write_bytes(checkpoint.read_bytes())
    return last


def refused(capsys, command: str, root: Path, *flags: str) -> str:
    """The one-line error of `oprd <command>` (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run(command, root, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oprd {command}: error: ") and err.count("error:") == 1
    return err


def test_resuming_last_checks_what_the_checkpoint_fixes(trained, tmp_path, capsys, no_weight_loading):
    last = copy_of(trained, tmp_path)
    for ckpt_path in (str(last), "last"):  # the same check, by path and by Lightning's name
        err = refused(capsys, "fit", tmp_path, "--ckpt_path", ckpt_path, "--model.teacher.seed", "5")
        assert f"--ckpt_path {last} was trained with model.teacher = " in err
    last.write_bytes(trained.read_bytes()[:1000])  # cut short
    err = refused(capsys, "fit", tmp_path, "--ckpt_path", "last")
    assert f"--ckpt_path {last} is not a readable checkpoint (1000 bytes" in err


def test_last_with_no_earlier_run_starts_from_step_0_and_says_so(tmp_path, capsys):
    err = refused(capsys, "validate", tmp_path, "--ckpt_path", "last")  # nothing to evaluate: an error
    assert f"--ckpt_path last: there is no last.ckpt in {tmp_path / 'checkpoints'} to validate" in err
    fit(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "1")  # a job script's first run: a fresh start
    assert (
        f"oprd: --ckpt_path last: no last.ckpt in {tmp_path / 'checkpoints'} yet, so this run starts from step 0.\n"
        in capsys.readouterr().err
    )
    assert [row["step"] for row in logged(tmp_path, "fit")] == ["0"]


def test_best_is_refused_before_any_model_loads(tmp_path, capsys, no_weight_loading):
    err = refused(capsys, "validate", tmp_path, "--ckpt_path", "best")
    assert "--ckpt_path best: only the `oprd fit` that saved a best checkpoint knows which one it is" in err
    assert f"--ckpt_path {tmp_path / 'checkpoints'}/last.ckpt" in err


def test_a_resume_keeps_the_data_order_of_its_checkpoint(trained, tmp_path, capsys, no_weight_loading):
    copy_of(trained, tmp_path)  # 3 steps into the first epoch, at batch size 4
    err = refused(capsys, "fit", tmp_path, "--ckpt_path", "last", "--data.batch_size", "8")
    assert "stopped 3 batches into an epoch at data.batch_size 4, but this run sets 8" in err
    assert "Resume with --data.batch_size 4." in err
    err = refused(capsys, "fit", tmp_path, "--ckpt_path", "last", "--data.seed", "5")
    assert "was trained with data.seed = 0, but this run sets 5" in err


def test_model_and_data_seeds_of_their_own_are_logged(tmp_path):
    fit(tmp_path, "--trainer.max_steps", "1", "--model.seed", "5", "--data.seed", "3")
    hparams = (tmp_path / "fit/hparams.yaml").read_text()
    assert "\nseed: 5\n" in hparams and "\n  seed: 3\n" in hparams  # the data's under `data:`


def test_a_run_that_fails_before_its_first_save_leaves_the_earlier_last_ckpt(tmp_path, capsys):
    fit(tmp_path, "--trainer.max_steps", "2")
    huge = ("--model.optim.lr", "1e3", "--model.optim.projector_lr", "1e3", "--model.optim.warmup_steps", "0")
    with pytest.raises(SystemExit):
        fit(tmp_path, "--trainer.max_steps", "8", *huge)  # diverges before its first periodic save
    assert "is not finite" in capsys.readouterr().err
    folder = tmp_path / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not list(folder.glob("earlier-run-*.ckpt"))


def test_extending_a_finished_run_continues_its_epoch(trained, tmp_path):
    constant = ("--model.optim.schedule", "constant", "--model.optim.warmup_steps", "0")
    copy_of(trained, tmp_path / "extended")
    fit(tmp_path / "extended", "--trainer.max_steps", "6", "--ckpt_path", "last", *constant)
    fit(tmp_path / "whole", "--trainer.max_steps", "6", *constant)
    extended = {r["step"]: (r["epoch"], r["train/loss"]) for r in logged(tmp_path / "extended", "fit")}
    whole = {r["step"]: (r["epoch"], r["train/loss"]) for r in logged(tmp_path / "whole", "fit")}
    assert list(extended) == ["3", "4", "5"]
    assert extended == {step: whole[step] for step in extended}  # same epoch, same prompts, same losses


def test_max_steps_0_is_refused_and_touches_nothing(trained, tmp_path, capsys, no_weight_loading):
    last = copy_of(trained, tmp_path)
    err = refused(capsys, "fit", tmp_path, "--trainer.max_steps", "0")
    assert "--trainer.max_steps 0 trains no step and saves nothing" in err
    assert last.read_bytes() == trained.read_bytes() and not list(last.parent.glob("earlier-run-*"))


def test_a_run_that_saves_no_checkpoint_says_so(tmp_path, capsys):
    fit(tmp_path, "--trainer.max_steps", "1", "--checkpoint.save_last", "false")
    assert "oprd: --checkpoint.save_last false with --checkpoint.save_top_k 0: this run saves no checkpoint" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "checkpoints").exists()
