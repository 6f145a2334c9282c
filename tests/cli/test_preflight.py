"""Bad input is refused before any model loads, in one line that names the flag and the fix; `--help` reads well."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oprd.cli import main
from oprd.cli.compare import parse_fit
from oprd.cli.preflight import taken_from_checkpoint, warn_heldout_tuned_on
from oprd.data import load_prompts, read_jsonl
from oprd.demo.builtin import ARITH_TEACHER, SMOLLM2
from oprd.models import ModelSpec
from oprd.module import DistillModule
from tests.helpers import ROOT, make_module
from tests.training.test_faults import save_model_folder

TINY = str(ROOT / "configs/tiny.yaml")
OPRD = Path(sys.executable).parent / "oprd"


def fit_fails(capsys, *flags: str) -> str:
    """Run `oprd fit` on the tiny config with `flags`; it must exit 2 and print one error line, returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oprd fit: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
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


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A folder of bad inputs (the run's own outputs go there too, not into the repository)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("a regular file: nothing can be created under it, not even by root")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200, "answer": "1"}) + "\n")
    lines = [json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) for i in range(8)]
    (tmp_path / "no-response.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "inf-lr.yaml").write_text("model:\n  optim: {lr: .inf}\n")
    (tmp_path / "nan-weight.yaml").write_text("model:\n  objective: {hidden_weight: .nan}\n")
    (tmp_path / "nan-temperature.yaml").write_text("model:\n  rollout: {temperature: .nan}\n")
    (tmp_path / "inf-temperature.yaml").write_text("model:\n  rollout: {temperature: .inf}\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # Outputs that cannot be written (a regular file as the parent folder stops root too).
        (["--checkpoint.dirpath", "{tmp}/a-file/ckpts"], "--checkpoint.dirpath {tmp}/a-file/ckpts cannot be written"),
        (
            ["--trainer.logger.init_args.save_dir", "{tmp}/a-file/logs"],
            "--trainer.logger.init_args.save_dir {tmp}/a-file/logs cannot be written",
        ),
        # Numbers out of range that Lightning or the first step would trip over.
        (["--config", "{tmp}/inf-lr.yaml"], "model.optim.lr must be a finite number, got inf"),
        (["--trainer.max_steps", "-5"], "--trainer.max_steps must be .* or -1 for no limit, got -5"),
        (["--trainer.max_epochs", "-3"], "--trainer.max_epochs must be .* or -1 for no limit, got -3"),
        (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be >= 1"),
        (["--config", "{tmp}/nan-weight.yaml"], "model.objective.hidden_weight must be >= 0 and finite, got nan"),
        (["--config", "{tmp}/nan-temperature.yaml"], "model.rollout.temperature must be > 0 and finite"),
        (["--config", "{tmp}/inf-temperature.yaml"], "model.rollout.temperature must be > 0 and finite"),
        # Settings that contradict each other.
        (
            ["--model.objective.balance", "true"],
            "model.objective.balance true .* there is no token term: set model.objective.token_loss",
        ),
        (
            ["--model.objective.hidden_weight", "0"],
            "model.objective.hidden_weight 0 with no token_loss leaves nothing to optimise",
        ),
        (["--model.eval.max_new_tokens", "0"], "model.eval.max_new_tokens must be >= 1"),
        (["--model.guard.max_skips", "0"], "model.guard.max_skips must be >= 1, got 0"),
        (
            ["--model.teacher_placement.shard", "true", "--model.teacher_placement.offload", "true"],
            "model.teacher_placement.shard spreads the teacher over all devices: drop device and offload",
        ),
        (
            ["--model.rollout.do_sample", "false", "--model.rollout.num_generations", "3"],
            "model.rollout.num_generations must be 1 with do_sample: false",
        ),
        (["--model.student.keep_every", "0"], "model.student.keep_every must be at least 1"),
        # Data the run would reach only part-way through.
        (
            ["--model.truncate_prompts", "false", "--data.train", "{tmp}/long.jsonl", "--data.val", "{tmp}/long.jsonl"],
            "--model.truncate_prompts false: prompt 1 of {tmp}/long.jsonl .* more than --model.max_prompt_length 64",
        ),
        (
            ["--model.rollout.lmbda", "0.5", "--data.train", "{tmp}/no-response.jsonl"],
            '--model.rollout.lmbda 0.5 .* 8 of 8 prompts in {tmp}/no-response.jsonl have no "response"',
        ),
        # The reason a value is refused, not only the key.
        (["--model.optim.lr", "-1e-3"], "model.optim.lr must be > 0, got -0.001"),
        (["--model.optim.lr", "abc"], "--model.optim.lr expects a float, got 'abc'"),
        (["--model.optim.lr", "nan"], "--model.optim.lr must be a finite number, got nan"),
        (
            ["--model.objective.hidden_weight", "nan"],
            "--model.objective.hidden_weight must be a finite number, got nan",
        ),
        (["--model.optim.projector_lr", "fast"], "--model.optim.projector_lr expects a float or null, got 'fast'"),
        (["--model.optim.schedule", "linear"], "--model.optim.schedule expects one of cosine, constant"),
        (["--ckpt_path", "{tmp}/checkpoints"], "--ckpt_path {tmp}/checkpoints is a folder .* holds last.ckpt"),
    ],
)
def test_bad_input_is_named_in_one_line_before_any_model_loads(flags, message, inputs, capsys, no_weight_loading):
    flags = [flag.format(tmp=inputs) for flag in flags]
    assert re.search(message.format(tmp=re.escape(str(inputs))), fit_fails(capsys, *flags))


def test_a_teacher_device_that_does_not_exist_is_refused(capsys, inputs, no_weight_loading):
    device = f"cuda:{max(torch.cuda.device_count(), 1)}"  # one past the last GPU, with or without CUDA
    line = fit_fails(capsys, "--model.teacher_placement.device", device)
    assert f"--model.teacher_placement.device {device}: PyTorch sees" in line and "Drop it" in line


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the message shown without vLLM")
def test_the_vllm_engine_without_vllm_is_refused(capsys, inputs, no_weight_loading):
    assert "vllm needs vLLM: `pip install 'oprd[vllm]'`" in fit_fails(capsys, "--model.rollout.engine", "vllm")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  seed: 2\nmodel:\n  tokenizer: tiny\n", ":3:1: 'model' is given twice .* line 1"),
        ("model:\n  optim: {lr: 1e-3\n  seed: 1\n", r":3:7: expected ',' or '}'"),
        ("", " is empty: write settings by section"),
        ("hello\n", r" holds a str \('hello'\), not settings"),
        ("import os\nx = {'a': [1, 2}\n", ":2:"),  # a Python file given by mistake
        (b"\x80\x81\x00PK", " is not a text file"),
    ],
)
def test_a_config_file_that_is_not_settings_is_named_with_its_line(text, message, inputs, capsys, no_weight_loading):
    config = inputs / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert re.search(f"--config {re.escape(str(config))}{message}", fit_fails(capsys, "--config", str(config)))


def test_a_checkpoint_with_running_statistics_needs_its_hidden_loss(inputs, capsys, no_weight_loading):
    # standardized_mse keeps the teacher's running moments in the checkpoint; a run with another loss cannot take them.
    ckpt = inputs / "standardized.ckpt"
    hparams = {"objective": {"hidden_loss": {"kind": "standardized_mse"}}}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, ckpt)
    line = fit_fails(capsys, "--ckpt_path", str(ckpt))
    assert "model.objective.hidden_loss.kind = 'standardized_mse', and this run sets 'mse'" in line
    assert "Set --model.objective.hidden_loss.kind standardized_mse" in line


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "flag",
            "--model.hidden_loss.kind is now --model.objective.hidden_loss.kind: the model's settings are grouped",
        ),
        ("config", "--config {config}: model.val_max_new_tokens is now model.eval.max_new_tokens"),
        ("checkpoint", "--ckpt_path {ckpt} was written by an earlier oprd, whose model settings were not grouped"),
    ],
)
def test_a_setting_of_the_flat_layout_is_named_with_its_new_key(where, message, inputs, capsys, no_weight_loading):
    config, ckpt = inputs / "flat.yaml", inputs / "flat.ckpt"
    config.write_text("model:\n  val_max_new_tokens: 8\n")
    torch.save({"state_dict": {}, "hyper_parameters": {"shard_teacher": False, "teacher": {}}}, ckpt)
    flags = {
        "flag": ["--model.hidden_loss.kind", "cosine"],
        "config": ["--config", str(config)],
        "checkpoint": ["--ckpt_path", str(ckpt)],
    }[where]
    line = fit_fails(capsys, *flags)
    assert message.format(config=config, ckpt=ckpt) in line
    if where == "checkpoint":
        assert "model.shard_teacher is now model.teacher_placement.shard" in line


def test_what_a_checkpoint_fixes_is_read_through_the_groups():
    saved = {"tokenizer": None, "objective": {"layer_map": "last", "projector": "linear"}}
    # Left at their defaults, the run takes the checkpoint's layer map (a nested setting) and tokenizer.
    given = {"tokenizer": None, "objective": {"layer_map": "uniform", "projector": "linear"}}
    assert taken_from_checkpoint(given, saved, "a.ckpt") == ["objective.layer_map"]
    # A setting the checkpoint holds as None is still one it fixes.
    with pytest.raises(ValueError, match="was trained with model.tokenizer = null, but this run sets 'tiny'"):
        taken_from_checkpoint({**given, "tokenizer": "tiny"}, saved, "a.ckpt")
    with pytest.raises(ValueError, match="model.objective.projector = 'linear', but this run sets 'bridge'"):
        taken_from_checkpoint({**given, "objective": {"projector": "bridge"}}, saved, "a.ckpt")


def test_a_checkpoint_fixes_its_teachers():
    b = {"model": {"path": "tiny"}, "layer_map": "last", "placement": {}}
    saved = {"tokenizer": None, "teachers": {"b": b}}
    assert taken_from_checkpoint({"tokenizer": None}, saved, "a.ckpt") == ["teachers"]  # a resume without them
    with pytest.raises(ValueError, match="was trained with model.teachers = .*but this run sets"):
        taken_from_checkpoint({"tokenizer": None, "teachers": {"b": {**b, "layer_map": "uniform"}}}, saved, "a.ckpt")


def test_a_prompt_naming_a_teacher_the_run_lacks_fails_before_any_model_loads(tmp_path, capsys, no_weight_loading):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "teacher": "b"}\n{"prompt": "b", "teacher": "c"}\n{"prompt": "c"}\n')
    teachers = '{"b": {"model": {"path": "tiny"}}}'
    line = fit_fails(capsys, "--data.train", str(prompts), "--data.val", str(prompts), "--model.teachers", teachers)
    assert f"{prompts}: prompts name the teacher 'c', which this run does not have (model.teachers: b)" in line
    line = fit_fails(capsys, "--data.train", str(prompts), "--data.val", str(prompts))
    assert "teacher 'b', which this run does not have (model.teachers is not set)" in line


def test_several_teachers_on_two_devices_are_refused_before_any_model_loads(capsys, no_weight_loading):
    teachers = '{"b": {"model": {"path": "tiny"}}}'
    line = fit_fails(capsys, "--model.teachers", teachers, "--trainer.devices", "2")
    assert "--model.teachers runs in one process for now (--trainer.devices 2, --trainer.num_nodes 1)" in line
    assert "Set --trainer.devices 1 --trainer.num_nodes 1, or train one teacher." in line


def test_several_teachers_with_devices_auto_count_the_visible_gpus(capsys, monkeypatch, no_weight_loading):
    teachers = '{"b": {"model": {"path": "tiny"}}}'
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    flags = ["--model.teachers", teachers, "--trainer.devices", "auto"]
    line = fit_fails(capsys, *flags, "--trainer.accelerator", "auto")
    assert "--model.teachers runs in one process for now (--trainer.devices auto," in line
    # On the CPU, `auto` is one device: the run goes on to the next check (here: an unwritable root).
    line = fit_fails(capsys, *flags, "--trainer.accelerator", "cpu", "--trainer.default_root_dir", "/dev/null/root")
    assert "--trainer.default_root_dir /dev/null/root cannot be written" in line


def test_preflight_reads_each_prompt_source_once(inputs, capsys, monkeypatch, no_weight_loading):
    # Every data check runs (responses, teacher names, prompt lengths); the unwritable root then stops the fit.
    import oprd.cli.preflight as preflight

    read, load = [], preflight.load_prompts
    monkeypatch.setattr(
        preflight, "load_prompts", lambda source, split, **kw: read.append((source, split)) or load(source, split, **kw)
    )
    prompts = inputs / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 plus 1?", "answer": "2", "response": "2"}) + "\n")
    flags = ["--data.train", str(prompts), "--data.val", str(prompts), "--model.rollout.lmbda", "0.5"]
    flags += ["--model.truncate_prompts", "false", "--model.teachers", '{"b": {"model": {"path": "tiny"}}}']
    line = fit_fails(capsys, *flags, "--trainer.default_root_dir", str(inputs / "a-file" / "root"))
    assert "--trainer.default_root_dir" in line and "cannot be written" in line
    assert sorted(read) == [(str(prompts), "train"), (str(prompts), "val")]


def test_held_out_prompts_the_demo_teacher_was_tuned_on_are_warned_of_before_any_model_loads(caplog):
    # The demo teacher was tuned on data.seed 0's training pairs of 1..20: another seed's held-out pairs are those
    # pairs but for the few that seed 0 also holds out.
    seed1 = load_prompts("arithmetic", "val", seed=1)
    also_held_out_at_seed0 = {x["prompt"] for x in seed1} & {x["prompt"] for x in load_prompts("arithmetic", "val")}
    quickstart = ["--config", str(ROOT / "configs/quickstart.yaml")]
    with caplog.at_level(logging.WARNING, logger="oprd.cli.preflight"):
        parse_fit(quickstart)  # data.seed 0: nothing to warn of
        warn_heldout_tuned_on([SMOLLM2, None], seed1, 1)  # not the tuned teacher
        assert not caplog.records
        parse_fit([*quickstart, "--data.seed", "1"])
        # the tuned teacher as one of several: the default teacher is the plain model
        extra = json.dumps({"arith": {"model": {"path": ARITH_TEACHER}}})
        parse_fit([*quickstart, "--data.seed", "1", "--model.teacher.path", SMOLLM2, "--model.teachers", extra])
    tuned = len(seed1) - len(also_held_out_at_seed0)
    assert 50 < tuned < 100
    assert [r.getMessage() for r in caplog.records] == 2 * [
        f"{tuned} of the 100 held-out prompts are prompts the teacher {ARITH_TEACHER} was fine-tuned on (the "
        "training split of data.seed 0; this run holds out data.seed 1's): its accuracy and the teacher-scored KL "
        "there are flattered. Keep --data.seed 0 with this teacher for held-out figures."
    ]
