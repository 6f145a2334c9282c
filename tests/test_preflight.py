"""Bad input is refused before any model loads, in one line that names the flag and the fix; `--help` reads well."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oprd.cli import main
from oprd.data import read_jsonl
from oprd.models import ModelSpec
from oprd.module import DistillModule
from tests.conftest import ROOT, make_module
from tests.test_faults import save_model_folder

TINY = str(ROOT / "configs/tiny.yaml")
OPRD = Path(sys.executable).parent / "oprd"


def fit_fails(capsys, *flags: str) -> str:
    """Run `oprd fit` on the tiny config with `flags`; it must exit 2 and print one error line, returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oprd fit: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.optim.lr=-1e-5"], "model.optim.lr must be > 0, got -1e-05"),
        (["--model.optim.lr", "0"], "model.optim.lr must be > 0, got 0.0"),
        (["--model.optim.warmup_steps=-1"], "model.optim.warmup_steps must be >= 0"),
        (["--model.rollout.top_p", "1.5"], r"model.rollout.top_p must lie in \(0, 1\]"),
        (["--model.rollout.top_p", "0"], r"model.rollout.top_p must lie in \(0, 1\]"),
        (["--model.max_prompt_length", "0"], "model.max_prompt_length must be >= 1"),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
        (["--model.max_prompt_length", "250"], r"more than the models' position limit \(256"),
        (["--ckpt_path", "no/such.ckpt"], "--ckpt_path no/such.ckpt does not exist"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(flags, message, capsys, no_weight_loading):
    assert re.search(message, fit_fails(capsys, *flags))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused(capsys, no_weight_loading):
    assert "--trainer.accelerator cpu" in fit_fails(capsys, "--trainer.accelerator", "gpu")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, capsys, no_weight_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = fit_fails(capsys, "--trainer.default_root_dir", str(blocker / "run"))
    assert f"--trainer.default_root_dir {blocker / 'run'} cannot be written" in line


def test_a_checkpoint_that_is_empty_or_not_a_checkpoint_is_named(tmp_path, capsys, no_weight_loading):
    empty, text = tmp_path / "empty.ckpt", tmp_path / "notes.ckpt"
    empty.write_bytes(b"")
    text.write_text("hello")
    assert f"--ckpt_path {empty} is empty (0 bytes)" in fit_fails(capsys, "--ckpt_path", str(empty))
    assert f"--ckpt_path {text} is not a readable checkpoint" in fit_fails(capsys, "--ckpt_path", str(text))


def test_a_checkpoint_that_pickles_objects_is_named_as_another_versions(tmp_path, capsys, no_weight_loading):
    # An older oprd saved its settings as dataclasses: a safe load refuses them, and the error says why.
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"teacher": ModelSpec(path="x")}}, old)
    line = fit_fails(capsys, "--ckpt_path", str(old))
    assert "holds Python objects (oprd.models.spec.ModelSpec)" in line and "older oprd" in line
    assert "cut short" not in line


def test_a_misspelt_key_gets_one_line_and_a_suggestion(tmp_path, capsys):
    assert "--model.hiden_loss.kind" in fit_fails(capsys, "--model.hiden_loss.kind", "cosine")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  hiden_loss: {kind: cosine}\n")
    fit_fails(capsys, "--config", str(typo))
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--model.optim.lrr", "1e-4"])
    err = capsys.readouterr().err
    assert "did you mean --model.optim.lr?" in err and len(err.splitlines()) <= 3 and "Traceback" not in err


def test_debug_shows_the_full_traceback(capsys):
    run = subprocess.run(
        [str(OPRD), "fit", "--config", TINY, "--model.optim.lr", "-1", "--debug"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode != 0 and "Traceback" in run.stderr and "model.optim.lr must be > 0" in run.stderr


def test_a_relative_model_path_that_does_not_exist_fails_at_once(tmp_path, monkeypatch, no_weight_loading):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for path in ("runs/studnet", "./studnet", "models/v2/student"):
        with pytest.raises(ValueError, match=f"Model folder {path} does not exist"):
            make_module(student=ModelSpec(path=path))


def test_mismatched_tokenizers_are_refused_even_when_a_tokenizer_is_named(tmp_path, no_weight_loading):
    teacher, student = save_model_folder(tmp_path / "t", 384), save_model_folder(tmp_path / "s", 300)
    with pytest.raises(ValueError, match="Teacher and student tokenizers differ"):
        DistillModule(teacher=ModelSpec(path=teacher), student=ModelSpec(path=student), tokenizer="tiny")


def test_prompt_files_with_a_byte_order_mark_load_and_other_encodings_are_named(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "What is 1 plus 2?", "answer": "3"}\n')
    assert read_jsonl(bom) == [{"prompt": "What is 1 plus 2?", "answer": "3", "response": None}]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "Hi"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8 text"):
        read_jsonl(latin)


def test_help_puts_oprd_options_first_with_their_descriptions(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    model, trainer = text.index("--model.optim.lr"), text.index("--trainer.accelerator ")
    assert model < trainer and text.index("--data.batch_size") < trainer
    for description in ("Learning rate of the student", "Nucleus sampling threshold", "Weights dtype"):
        assert description in text
