import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from oprd.cli import main
from oprd.models import ModelSpec, load_config, load_model
from tests import wandb_reader
from tests.helpers import ROOT

# The shipped configs and the candidate objectives of the quality sweep (benchmarks/RESULTS.md).
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks/objectives").glob("*.yaml"))
# Objective fragments hold no models: they compose with a model config.
FRAGMENTS = [p for p in CONFIGS if "teacher:" not in p.read_text()]
TOKEN_FRAGMENTS = [
    p for p in FRAGMENTS if yaml.safe_load(p.read_text())["model"].get("objective", {}).get("token_loss")
]
OPRD = Path(sys.executable).parent / "oprd"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    base = ["--config", str(ROOT / "configs/tiny.yaml")] if config in FRAGMENTS else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed


def test_unknown_config_key_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.no_such_key", "1"])
    assert exit_info.value.code != 0


def test_tiny_fit_learns_and_checkpoints_only_student_and_projectors(tmp_path):
    # The real console script, as a user runs it.
    run = subprocess.run(
        [
            str(OPRD),
            "fit",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--trainer.max_steps",
            "30",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    (ckpt_path,) = tmp_path.glob("**/last.ckpt")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("student.model.layers.") for k in state)
    assert {k for k in state if k.startswith("objective.")} == {
        "objective.projectors.proj.0_0.weight",
        "objective.projectors.proj.1_3.weight",
    }
    assert not any("teacher" in k for k in state)
    assert state["objective.projectors.proj.1_3.weight"].shape == (64, 32)
    from oprd.module import DistillModule

    restored = DistillModule.load_from_checkpoint(ckpt_path)  # the hparams' YAML round-trip rebuilds the module
    assert torch.equal(restored.objective.projectors.proj["1_3"].weight, state["objective.projectors.proj.1_3.weight"])


def test_wandb_offline_run_holds_the_logged_metrics(wandb_offline):
    # The same run logs to W&B (through the quickstart's logger) and to CSV: what W&B holds must be exactly what the
    # CSV logger wrote, and W&B prints no warning of its own.
    loggers = wandb_offline / "loggers.yaml"
    loggers.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": [
                        {
                            "class_path": "oprd.evaluation.report.AutoWandbLogger",
                            "init_args": {"offline": True, "save_dir": str(wandb_offline), "project": "oprd-test"},
                        },
                        {
                            "class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": str(wandb_offline)},
                        },
                    ]
                }
            }
        )
    )
    run = subprocess.run(
        [str(OPRD), "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(loggers),
         "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
         "--trainer.default_root_dir", str(wandb_offline)],
        cwd=wandb_offline,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wandb: WARNING" not in run.stdout + run.stderr
    (run_dir,) = (wandb_offline / "wandb").glob("offline-run-*")
    rows = wandb_reader.history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["trainer/global_step"] for r in train] == [0, 1, 2, 3]
    assert {"train/hidden/0_0", "train/hidden/1_3", "train/response_length", "train/tokens_per_s"} <= set(train[0])
    (metrics_file,) = wandb_offline.glob("**/metrics.csv")
    csv_rows = list(csv.DictReader(metrics_file.open()))
    csv_train = {int(r["step"]): r for r in csv_rows if r.get("train/loss")}
    for row in train:
        for key in ("train/loss", "train/cos/1_3", "train/hidden/0_0", "train/response_length"):
            assert row[key] == float(csv_train[row["trainer/global_step"]][key]), key
    val = [r for r in rows if "val/hidden" in r]
    (csv_val,) = [r for r in csv_rows if r.get("val/hidden")]
    assert len(val) == 1 and val[0]["val/accuracy"] == float(csv_val["val/accuracy"])
    assert val[0]["val/reverse_kl"] == float(csv_val["val/reverse_kl"]) > 0
    config = wandb_reader.config(run_dir)
    assert config["objective"]["layer_map"] == "uniform" and config["rollout"]["max_new_tokens"] == 16


@pytest.mark.parametrize("fragment", TOKEN_FRAGMENTS, ids=lambda p: p.name)
def test_objective_fragments_train_and_log_token_kl(fragment, tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--config",
            str(fragment),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--data.max_val_prompts",
            "4",
        ]
    )
    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    kl = [float(r["train/token_kl"]) for r in rows if r.get("train/token_kl")]
    assert len(kl) == 3 and all(math.isfinite(v) for v in kl)
    objective = yaml.safe_load(fragment.read_text())["model"]["objective"]
    wanted = objective["token_loss"]
    if wanted["estimator"] == "exact":  # an exact KL between two different random models is strictly positive
        assert min(kl) > 0
    assert float(next(r["val/reverse_kl"] for r in rows if r.get("val/reverse_kl"))) > 0
    hidden = [float(r["train/hidden"]) for r in rows if r.get("train/hidden")]
    warm_start = objective.get("warm_start")  # its hidden weight (default 1) keeps the term for its steps
    has_hidden = max(objective.get("hidden_weight", 1.0), warm_start.get("hidden_weight", 1.0) if warm_start else 0) > 0
    assert (max(hidden) > 0) == has_hidden
    # The fragment's objective is the one that ran, and it trained the student.
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert wanted.items() <= checkpoint["hyper_parameters"]["objective"]["token_loss"].items()
    spec = ModelSpec(**checkpoint["hyper_parameters"]["student"])
    fresh = load_model(spec, load_config(spec, 384)).state_dict()
    trained = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    assert any(not torch.equal(fresh[k], v) for k, v in trained.items())


@pytest.mark.parametrize("name", ["predictions.jsonl", "predictions.rank1.jsonl"])
def test_predict_refuses_to_write_over_its_own_prompt_file(tmp_path, capsys, no_weight_loading, name):
    prompts = tmp_path / name
    prompts.write_text('{"prompt": "What is 1 plus 2?", "answer": "3"}\n')
    before = prompts.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([
            "predict", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.val", str(prompts),
        ])  # fmt: skip
    assert exit_info.value.code == 2
    assert "is where `oprd predict` writes its responses" in capsys.readouterr().err
    assert prompts.read_bytes() == before
