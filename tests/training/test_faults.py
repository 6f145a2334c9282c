"""Exact resume after a real SIGKILL, a checkpoint on SIGTERM / Ctrl-C, atomic writes, bad input refused early.

The run tests drive the real `oprd` console script in subprocesses and signal them as a cluster or a user would.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import torch

from oprd.cli import main
from oprd.data import PromptDataModule, ResumableLoader, ResumableSampler
from oprd.models import ModelSpec, load_tokenizer, tiny_tokenizer
from oprd.module import DistillModule
from oprd.training.checkpoint import check_state_shapes
from tests.helpers import ROOT, STUDENT, TEACHER, make_module

OPRD = Path(sys.executable).parent / "oprd"
MAX_STEPS = 8
# One thread: the tiny models gain nothing from more, and the runs stay bit-for-bit comparable on a busy machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def fit_command(root: Path, *extra: str) -> list[str]:
    """`oprd fit` on the tiny config: no validation, CSV logs and checkpoints under `root`."""
    return [
        str(OPRD), "fit", "--config", str(ROOT / "configs/tiny.yaml"),
        "--trainer.max_steps", str(MAX_STEPS), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        *extra,
    ]  # fmt: skip


@pytest.fixture
def start():
    """Start a command in `root` (output in `root/output.log`); whatever still runs after the test is killed."""
    started = []

    def run(command: list[str], root: Path) -> subprocess.Popen:
        root.mkdir(parents=True, exist_ok=True)
        with (root / "output.log").open("w") as log:
            # A shell's background jobs (and some CI runners) start with SIGINT ignored, which children inherit;
            # give the run the default disposition a user's terminal gives it, so Ctrl-C reaches it.
            started.append(
                subprocess.Popen(
                    command,
                    cwd=root,
                    env=ENV,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                )
            )
        return started[-1]

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(process: subprocess.Popen, condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (result := condition()) is not None:
            return result
        assert process.poll() is None, f"the run ended before {what}"
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_step(path: Path, at_least: int) -> int | None:
    """The global step of `path` once it reaches `at_least` (atomic writes: a file that exists is complete)."""
    if not path.exists():
        return None
    step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    return step if step >= at_least else None


def train_losses(metrics: Path) -> dict[int, str]:
    """Step -> `train/loss` as written (strings: compared exactly, not approximately)."""
    return {int(r["step"]): r["train/loss"] for r in csv.DictReader(metrics.open()) if r.get("train/loss")}


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, start):
    every_step = ("--checkpoint.every_n_train_steps", "1")
    reference = start(fit_command(tmp_path / "reference", *every_step), tmp_path / "reference")
    victim = start(fit_command(tmp_path / "run", *every_step), tmp_path / "run")  # both start at once: half the wait
    last = tmp_path / "run/checkpoints/last.ckpt"
    saved = wait_until(victim, lambda: checkpoint_step(last, at_least=3), "a checkpoint at step 3")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert reference.wait(timeout=240) == 0, (tmp_path / "reference/output.log").read_text()[-3000:]

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    assert saved <= step < MAX_STEPS, "the run must be killed mid-way to test a resume"
    assert {"optimizer_states", "lr_schedulers", "rng_states"} <= set(checkpoint)
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"student", "objective"}
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": step, "batch_size": 4, "ranks": 1}
    ]

    resume = fit_command(tmp_path / "run", *every_step, "--trainer.logger.init_args.version", "resumed")
    resumed = subprocess.run(
        [*resume, "--ckpt_path", "last"], cwd=tmp_path / "run", env=ENV, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = train_losses(next((tmp_path / "reference").glob("**/metrics.csv")))
    got = train_losses(tmp_path / "run/resumed/metrics.csv")
    assert sorted(expected) == list(range(MAX_STEPS))
    assert sorted(got) == list(range(step, MAX_STEPS))  # it continued from the checkpoint, not from scratch
    assert got == {s: expected[s] for s in got}


@pytest.mark.parametrize(("signum", "name", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 1)])
def test_signal_saves_a_checkpoint_at_the_end_of_the_step_and_exits(tmp_path, start, signum, name, code):
    # No periodic checkpoints, and CSV rows flushed every step: a row on disk means training is under way.
    flush_every_step = ("--trainer.logger.init_args.flush_logs_every_n_steps", "1")
    process = start(fit_command(tmp_path, "--trainer.max_steps", "1000", *flush_every_step), tmp_path)
    wait_until(process, lambda: next(tmp_path.glob("**/metrics.csv"), None), "the first training step")
    assert not (tmp_path / "checkpoints").exists()
    process.send_signal(signum)
    assert process.wait(timeout=120) == code
    output = (tmp_path / "output.log").read_text()
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    assert f"{name}: saved a checkpoint at step {step} " in output, output[-3000:]
    assert 1 <= step < 1000
    # Saved between two steps: the data position is exactly the number of optimizer steps taken.
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": step, "batch_size": 4, "ranks": 1}
    ]
    # Every step that made it into the checkpoint has its loss logged, the last one included.
    assert sorted(train_losses(next(tmp_path.glob("**/metrics.csv")))) == list(range(step))


def test_the_train_loader_continues_an_epoch_where_the_checkpoint_left_it():
    data = PromptDataModule(batch_size=4, seed=3)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)  # as Lightning does at each epoch start
    epoch = [batch["prompt"] for batch in loader]
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    assert loader.state_dict() == {"epoch": 1, "batches": 5, "batch_size": 4, "ranks": 1}
    resumed = data.train_dataloader()  # what a new process builds
    resumed.load_state_dict(loader.state_dict())
    assert [batch["prompt"] for batch in resumed] == epoch[5:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(epoch), "batch_size": 4, "ranks": 1}
    resumed.load_state_dict(resumed.state_dict())  # saved after the last batch: the next epoch, from its start
    assert resumed.sampler.epoch == 2 and len(list(resumed)) == len(epoch)


def test_the_train_loader_refuses_a_position_counted_in_other_batches():
    data = PromptDataModule(batch_size=4, seed=3)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    wider = PromptDataModule(batch_size=8, seed=3)
    wider.setup("fit")
    # 3 batches of 4 are prompts 0-11; counted in batches of 8 they would end at prompt 23, and 12-23 be skipped.
    with pytest.raises(ValueError, match="stopped 3 batches into an epoch at data.batch_size 4, but this run sets 8"):
        wider.train_dataloader().load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="stopped mid-epoch on 1 processes .* but this run has 2"):
        sharded = ResumableLoader(data.train_items, batch_size=4, sampler=ResumableSampler(data.train_items, 3, 2))
        sharded.load_state_dict(loader.state_dict())
    at_the_start = wider.train_dataloader()
    at_the_start.load_state_dict({**loader.state_dict(), "batches": 0})  # nothing to skip: any batch size will do
    assert len(list(at_the_start)) == len(at_the_start)


CRASH_MID_WRITE = """
import os, signal, sys, torch
from oprd.training.checkpoint import AtomicCheckpointIO

class DiesWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, sys.argv[1])
io.save_checkpoint({"step": 2, "weights": torch.zeros(1000), "boom": DiesWhilePickled()}, sys.argv[1])
"""


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    run = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(path)], env=ENV, capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-3000:]
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    assert (tmp_path / ".last.ckpt.partial").exists()  # the killed write went next to it, never into it


# ---- bad input: a clear error before any weights load (the other cases live in test_data / test_align / test_losses)


def save_model_folder(folder: Path, vocab_size: int) -> str:
    from transformers import LlamaConfig

    fields = {k: v for k, v in TEACHER.items() if k != "model_type"}
    LlamaConfig(**fields, vocab_size=vocab_size).save_pretrained(folder)
    tiny_tokenizer(vocab_size).save_pretrained(folder)
    return str(folder)


def test_teacher_and_student_with_different_vocabularies_are_refused(tmp_path, no_weight_loading):
    teacher, student = save_model_folder(tmp_path / "t", 384), save_model_folder(tmp_path / "s", 300)
    with pytest.raises(ValueError, match="Teacher and student tokenizers differ"):
        DistillModule(teacher=ModelSpec(path=teacher), student=ModelSpec(path=student))


def test_a_model_path_that_does_not_exist_is_named(tmp_path, no_weight_loading):
    with pytest.raises(ValueError, match=f"Model folder {tmp_path}/teacher does not exist"):
        make_module(teacher=ModelSpec(path=str(tmp_path / "teacher")))


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, caplog):
    tok = tiny_tokenizer()
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token)
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="oprd.models"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert "no pad token" in caplog.text


def test_a_checkpoint_of_another_student_width_is_refused_with_the_shapes(tmp_path):
    trained = make_module()
    narrow = make_module(student=ModelSpec(config={**STUDENT, "hidden_size": 16}, seed=2))
    shapes = r"objective\.projectors\.proj\.1_3\.weight is \[64, 32\] in the checkpoint but \[64, 16\] in this model"
    with pytest.raises(ValueError, match=shapes):
        check_state_shapes(narrow, trained.state_dict())
    # Through Lightning: the same mismatch, named with both shapes (ValueError once DistillModule checks it itself).
    path = tmp_path / "wide.ckpt"
    # Hyper-parameters as `oprd fit` stores them: the YAML round-trip of the configs, plain dicts.
    hparams = {k: asdict(v) if is_dataclass(v) else v for k, v in trained.hparams.items()}
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}
    torch.save(checkpoint, path)
    shapes = r"objective\.projectors\.proj\.1_3\.weight.*\[64, 32\].*\[64, 16\]"
    with pytest.raises((ValueError, RuntimeError), match=shapes):
        DistillModule.load_from_checkpoint(path, student=ModelSpec(config={**STUDENT, "hidden_size": 16}, seed=2))


def test_a_bad_prompt_file_fails_before_any_model_loads(tmp_path, no_weight_loading):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"question": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r'prompts\.jsonl:2: missing a non-empty "prompt"'):
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.train", str(prompts), "--debug"])
