"""`configs/compress.yaml`, the recipe for a smaller model, resolves and trains: the real SmolLM2 pruned in depth (by
block influence) and width to at most 0.4x its parameters, two steps of its warm start, the hidden term on the
channels the student copied. (The full run is a benchmark, benchmarks/RESULTS.md; here the arithmetic teacher is
replaced by the base SmolLM2 it was tuned from, the same architecture, which the suite builds in seconds.)"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml
from safetensors import safe_open

from oprd.cli import main
from tests.helpers import ROOT

pytestmark = pytest.mark.xdist_group("smollm2")  # under xdist: one worker builds the real model once

COMPRESS = ROOT / "configs/compress.yaml"


def test_the_compress_config_prunes_the_real_model_to_under_0_4x_and_trains_two_steps(smollm2_folder, tmp_path):
    main(["fit", "--config", str(COMPRESS), "--model.teacher.path", str(smollm2_folder),
          "--model.student.path", str(smollm2_folder), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.callbacks", "[]", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.version", "v",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False, mmap=True)
    student = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    with safe_open(next(smollm2_folder.glob("*.safetensors")), "pt") as weights:
        teacher_params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys() if "lm_head" not in k)
    student_params = sum(v.numel() for k, v in student.items() if "lm_head" not in k)
    assert student_params <= 0.4 * teacher_params
    recipe = yaml.safe_load(COMPRESS.read_text())["model"]
    kept = checkpoint["hyper_parameters"]["student"]["keep_layers"]
    assert len(kept) == recipe["student"]["depth"]["num_layers"]  # the layers block influence chose, saved
    logged = list(csv.DictReader(next(tmp_path.glob("**/v/metrics.csv")).open()))
    rows = [r for r in logged if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(float(r["train/on_policy"]) == 0 for r in rows)  # the data's reference answers
    # the warm start: the hidden term alone, each student channel against the teacher channel it was copied from
    assert [float(r["select/copied"]) for r in logged if r.get("select/copied")] == [1.0]
    assert all((float(r["train/hidden_weight"]), float(r["train/token_weight"])) == (1.0, 0.0) for r in rows)
