"""`oprd compare` on the tiny config: two objectives, a learning-rate grid, read back from its JSON and W&B runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from docstring_parser import parse_from_object
from rich.console import Console

import oprd.cli.compare
import oprd.compare.probe
from oprd.cli import main
from oprd.cli.compare import CliFits, parse_lrs
from oprd.compare.probe import CompareProbe
from oprd.compare.report import print_table
from oprd.compare.runner import CompareSettings, choose, compare
from oprd.data import PromptDataModule, arithmetic_examples
from oprd.rollout.engine import HFGenerateEngine
from oprd.training.memory import UpdateMemory
from tests import wandb_reader
from tests.helpers import ROOT, make_module, trainer

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("compare")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(out))
        env.setenv("WANDB_SILENT", "true")
        main([
            "compare", "--config", str(ROOT / "configs/tiny.yaml"), "--objectives", "oprd", "opd",
            "--lr", "3e-3", "1e-2", "opd=1e-2", "--steps", "4", "--eval_every", "2", "--eval_prompts", "8",
            "--final_heldout", "arithmetic-rephrased", "--out", str(out),
            "--", "--data.batch_size", "2", "--trainer.enable_progress_bar", "false",
            "--data.max_val_prompts", "2", "--trainer.val_check_interval", "2",  # neither applies to the comparison
        ])  # fmt: skip
    return out, json.loads((out / "compare.json").read_text())


def test_compare_writes_every_run_and_chooses_each_objectives_rate(compared):
    out, result = compared
    assert (out / "compare.png").stat().st_size > 0
    runs = {(r["objective"], r["lr"]) for r in result["runs"]}
    assert runs == {("oprd", 3e-3), ("oprd", 1e-2), ("opd", 1e-2)}  # `opd=` overrides the shared grid
    for objective, entry in result["summary"]["objectives"].items():
        assert entry["lr"] in entry["lrs_tried"] and entry["steps"] == 4
        selection = {lr: _final(result, objective, lr, "selection")["reverse_kl"] for lr in entry["lrs_tried"]}
        assert selection[entry["lr"]] == min(selection.values())  # chosen on the selection split
        assert entry["test"] == _final(result, objective, entry["lr"], "test")  # reported on the test split
        assert entry["update_s"] > 0 and entry["update_mib"] > 0
        assert entry["final_only"]["arithmetic-rephrased"]["step"] == 4
    assert {run["memory"] for run in result["runs"]} == {"update peak (CPU allocation replay)"}
    assert not result["summary"]["one_shared_learning_rate"]
    # --eval_prompts 8: 4 per split, though data.max_val_prompts is 2 (it caps the trainer's validation, not these)
    assert {row["answered"] for row in result["rows"] if row["split"] in ("test", "selection")} == {4.0}


def test_compare_starts_every_run_from_the_same_weights_and_scores_every_n_steps(compared):
    _, result = compared
    for run in result["runs"]:
        rows = [r for r in result["rows"] if (r["objective"], r["lr"]) == (run["objective"], run["lr"])]
        assert sorted({r["step"] for r in rows if r["split"] == "test"}) == [0, 2, 4]
    # Each run scores its own step 0: the same weights give the same answers and KL whatever the objective (its
    # hidden term and per-pair cosines differ: OPD has no layer pairs).
    own = ("objective", "lr", "hidden", "cos", "cos_final", "train_s")  # train_s: each run's own calibration
    starts = {json.dumps({k: v for k, v in r.items() if k not in own}, sort_keys=True)
              for r in result["rows"] if r["step"] == 0 and r["split"] == "test"}  # fmt: skip
    assert len(starts) == 1 and len([r for r in result["rows"] if r["step"] == 0 and r["split"] == "test"]) == 3
    test, selection = (_final(result, "oprd", 3e-3, s) for s in ("test", "selection"))
    assert test["reverse_kl"] != selection["reverse_kl"]  # two different halves of the held-out prompts


def test_compare_logs_one_wandb_run_per_objective_and_rate_in_one_group(compared):
    out, result = compared
    run_dirs = sorted(out.glob("**/wandb/offline-run-*"))
    infos = [wandb_reader.run(d) for d in run_dirs]
    assert sorted(i["name"] for i in infos) == ["opd-lr0.01", "oprd-lr0.003", "oprd-lr0.01"]
    assert {i["group"] for i in infos} == {result["summary"]["group"]}
    for run_dir, info in zip(run_dirs, infos, strict=True):
        history = wandb_reader.history(run_dir)
        assert any("train/loss" in row for row in history)
        assert not any(key.startswith("val/") for row in history for key in row)  # only the probe scores held-out
        objective, lr = {"opd-lr0.01": ("opd", 1e-2), "oprd-lr0.003": ("oprd", 3e-3), "oprd-lr0.01": ("oprd", 1e-2)}[
            info["name"]
        ]
        logged = [row["compare/test/reverse_kl"] for row in history if "compare/test/reverse_kl" in row]
        scored = [
            r["reverse_kl"] for r in result["rows"] if (r["objective"], r["lr"], r["split"]) == (objective, lr, "test")
        ]
        assert logged[-1] == scored[-1] and len(logged) >= 2  # the held-out curve is in W&B too
        assert any("compare/arithmetic-rephrased/accuracy" in row for row in history)


def test_the_table_names_each_objectives_chosen_rate_as_written_on_the_command_line(compared):
    _, result = compared
    console = Console(record=True, width=80)  # as narrow as a log file's
    print_table(result, console)
    text = console.export_text()
    assert "MiB: update peak (CPU allocation replay)" in " ".join(text.split())  # the caption says what MiB is
    main_table = text.split("final weights on")[0]
    rows = {
        line.split()[1]: line.split()[3] for line in main_table.splitlines() if line.split()[1:2] in (["oprd"], ["opd"])
    }
    chosen = result["summary"]["objectives"]
    assert rows == {name: {3e-3: "3e-3", 1e-2: "1e-2"}[entry["lr"]] for name, entry in chosen.items()}


def test_learning_rate_grids_and_bad_settings_are_parsed_and_refused():
    assert parse_lrs(["1e-5", "3e-5", "opd=3e-6,1e-5"]) == {"*": [1e-5, 3e-5], "opd": [3e-6, 1e-5]}
    with pytest.raises(ValueError, match="--lr 'opd=fast'"):
        parse_lrs(["opd=fast"])
    with pytest.raises(ValueError, match="not among --objectives"):
        CompareSettings(configs=["x.yaml"], objectives=["oprd"], lrs={"opd": [1e-5]})
    with pytest.raises(ValueError, match="neither a YAML file nor one of configs/"):
        CompareSettings(configs=["x.yaml"], objectives=["nope"])
    with pytest.raises(ValueError, match="--budget time needs --time_s"):
        CompareSettings(configs=["x.yaml"], budget="time")


def test_every_setting_is_a_flag_whose_help_is_its_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    docs = {param.arg_name: param.description for param in parse_from_object(CompareSettings).params}
    for field in fields(CompareSettings):
        flag = {"configs": "config", "lrs": "lr"}.get(field.name, field.name)
        if field.name in ("group", "extra"):
            assert f"--{flag} " not in shown
        else:
            assert f"--{flag} " in shown and " ".join(docs[field.name].split()[:5]) in shown, field.name


class Parsed(Exception):
    """Raised in place of the comparison, with the settings `oprd compare` parsed from its command line."""


def test_a_full_command_line_gives_its_settings(monkeypatch):
    def parsed(settings, fits):
        raise Parsed(settings)

    monkeypatch.setattr(oprd.cli.compare, "compare", parsed)
    with pytest.raises(Parsed) as got:
        main([
            "compare", "--config", "a.yaml", "b.yaml", "--objectives", "opd", "oprd", "--lr", "1e-5", "3e-5",
            "opd=3e-6,1e-5", "--steps", "50", "--eval_every", "10", "--budget", "time", "--time_s", "600",
            "--eval_prompts", "8", "--select", "accuracy", "--final_heldout", "arithmetic-rephrased",
            "arithmetic-large", "--out", "results", "--", "--data.batch_size", "4",
        ])  # fmt: skip
    settings = got.value.args[0]
    assert settings == CompareSettings(
        configs=["a.yaml", "b.yaml"], objectives=["opd", "oprd"], lrs={"*": [1e-5, 3e-5], "opd": [3e-6, 1e-5]},
        steps=50, eval_every=10, budget="time", time_s=600.0, eval_prompts=8, select="accuracy",
        final_heldout=["arithmetic-rephrased", "arithmetic-large"], out=Path("results"),
        extra=["--data.batch_size", "4"], group=settings.group,
    )  # fmt: skip


def _final(result: dict, objective: str, lr: float, split: str) -> dict:
    rows = [r for r in result["rows"] if r["objective"] == objective and r["lr"] == lr and r["split"] == split]
    return max(rows, key=lambda r: r["step"])


class DieAtTrainStart(L.Callback):
    """Ends its process at once, as the kernel's out-of-memory killer would."""

    def on_train_start(self, trainer, pl_module) -> None:
        os._exit(137)


def test_a_run_whose_process_dies_fails_the_comparison_with_its_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([
            "compare", "--config", str(ROOT / "configs/tiny.yaml"), "--objectives", "oprd", "--lr", "1e-2",
            "--steps", "2", "--eval_prompts", "4", "--out", str(tmp_path),
            "--", "--trainer.callbacks+=tests.compare.test_compare.DieAtTrainStart", "--trainer.logger", "false",
        ])  # fmt: skip
    assert "run oprd-lr0.01 died without a result" in capsys.readouterr().err


class WaitAtTrainStart(L.Callback):
    """Writes its process id to $OPRD_TEST_PIDFILE when training starts, then waits (a run still training)."""

    def on_train_start(self, trainer, pl_module) -> None:
        Path(os.environ["OPRD_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not collected it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_killed_comparison_takes_its_running_run_with_it(tmp_path):
    pidfile = tmp_path / "run.pid"
    command = [
        sys.executable, "-m", "oprd.cli.main", "compare", "--config", str(ROOT / "configs/tiny.yaml"), "--objectives",
        "oprd", "--lr", "1e-2", "--steps", "2", "--eval_prompts", "4", "--out", str(tmp_path / "out"), "--",
        "--trainer.callbacks+=tests.compare.test_compare.WaitAtTrainStart", "--trainer.logger", "false",
    ]  # fmt: skip
    env = {**os.environ, "OPRD_TEST_PIDFILE": str(pidfile), "WANDB_MODE": "disabled"}
    parent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not pidfile.exists() and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.5)
        run = int(pidfile.read_text())
        assert _alive(run)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 15
    while _alive(run) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(run), "the run outlived the comparison that started it"


# ---- what the probe measures, on the tiny pair in-process ------------------------------------------------------

MIB = 2**20


class MicroBatch(L.Callback):
    """Knows which micro-batch of an optimizer step is running (None outside training batches), and collects the
    update seconds the module logs for each. Registered after the probe, so its hooks run after the probe's."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.index, self.update_s = accumulate, None, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._read(trainer)
        self.index = batch_idx % self.accumulate

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.index = None

    def on_train_end(self, trainer, module) -> None:
        self._read(trainer)

    def _read(self, trainer) -> None:  # what the previous micro-batch logged, once the module's own hook has run
        if "train/update_s" in trainer.callback_metrics:
            self.update_s.append(float(trainer.callback_metrics["train/update_s"]))


def test_cpu_update_memory_is_the_peak_above_the_start_over_every_window():
    resident = torch.ones(64 * MIB, dtype=torch.uint8)  # weights and the like: not charged
    memory = UpdateMemory(torch.device("cpu"))
    memory.begin()
    kept = torch.ones(2 * MIB, dtype=torch.uint8)  # lives on into the next window (a gradient)
    memory.end()
    between = torch.ones(32 * MIB, dtype=torch.uint8)  # a rollout's KV cache, freed before the update
    del between
    memory.begin()
    torch.ones(8 * MIB, dtype=torch.uint8)  # a temporary of the second window
    memory.end()
    assert memory.close() == 10 * MIB
    del kept, resident


def _fit(tmp_path, probe: CompareProbe, module=None, steps: int = 3, accumulate: int = 1, hooks=()) -> MicroBatch:
    module = module or make_module()
    micro = MicroBatch(accumulate)
    for model, hook in hooks:
        embeddings = getattr(module.pair, model).get_input_embeddings()  # runs in every forward, early exit or not
        embeddings.register_forward_pre_hook(lambda *_, h=hook: h(micro))
    fit = trainer(tmp_path, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[probe, micro])
    fit.fit(module, PromptDataModule(batch_size=2))
    return micro


def _probe(**kwargs) -> CompareProbe:
    return CompareProbe({"test": arithmetic_examples("val")[:2]}, every=100, batch_size=2, **kwargs)


def test_update_memory_is_the_updates_true_peak_not_the_rollouts_nor_the_bytes_saved_for_backward(tmp_path):
    # Stand-ins for what the bytes saved for backward cannot see (a no-grad buffer of the teacher pass, freed at
    # once, like the teacher's logits or a checkpointed LM head's recomputed chunk) and for the rollout's KV cache,
    # which is not the update's: sizes far apart from the tiny pair's own few hundred KiB.
    def teacher_buffer(micro):
        if micro.index is not None:
            torch.ones(8 * MIB, dtype=torch.uint8)

    def rollout_buffer(micro):
        if micro.index is not None and not torch.is_grad_enabled():
            torch.ones(64 * MIB, dtype=torch.uint8)

    probe = _probe()
    _fit(tmp_path, probe, hooks=[("teacher", teacher_buffer), ("student", rollout_buffer)])
    summary = probe.summary()
    assert 8 <= summary["update_mib"] < 64
    assert summary["memory"] == "update peak (CPU allocation replay)"


def test_with_gradient_accumulation_time_and_memory_cover_the_whole_optimizer_step(tmp_path):
    def first_micro_batch_buffer(micro):  # only in the first of the step's two micro-batches
        if micro.index == 0:
            torch.ones(8 * MIB, dtype=torch.uint8)

    probe = _probe()
    micro = _fit(tmp_path, probe, steps=3, accumulate=2, hooks=[("teacher", first_micro_batch_buffer)])
    assert probe.summary()["update_mib"] >= 8
    per_step = [micro.update_s[i] + micro.update_s[i + 1] for i in range(0, len(micro.update_s), 2)]
    probed = probe.probed[0] - 1  # the probed step's seconds include the profiler: not among the update seconds
    # The logged seconds are float32 (each rounded by at most 2**-24 of itself), the probe's float64.
    expected = [s for i, s in enumerate(per_step) if i != probed]
    assert len(per_step) == 3 and probe.update_s == pytest.approx(expected, rel=2**-23, abs=0)


class SlowSync(HFGenerateEngine):
    """An engine whose weight sync takes `SYNC_S` seconds (as copying weights into vLLM does)."""

    SYNC_S = 1.0

    def sync_weights(self, model, step: int) -> None:
        time.sleep(self.SYNC_S)


def test_the_clock_counts_weight_sync_and_calibration_and_not_the_evaluations(tmp_path):
    module = make_module()
    module.pair.engine = SlowSync()
    probe = _probe()
    probe.every = 1  # an evaluation after every step: none of it is training time
    _fit(tmp_path, probe, module=module, steps=3)
    assert len(probe.step_s) == 2 and min(probe.step_s.values()) >= SlowSync.SYNC_S  # the module syncs after the probe
    # Calibration (none here), the two unprobed steps, and the probed one at their median: the same for every row.
    expected = probe.calibrate_s + sum(probe.step_s.values()) + statistics.median(probe.step_s.values())
    assert probe.train_s == expected and [r["train_s"] for r in probe.rows][-1] == expected
    assert [r["step"] for r in probe.rows] == [0, 1, 2, 3]


def test_a_time_budget_stops_before_the_step_that_would_overshoot_it(tmp_path, monkeypatch):
    # The probe's clock is a virtual one that only the teacher pass advances (1.5 s a step): how long the tiny step
    # really takes on a loaded machine must not decide whether the run stops in time.
    clock = {"now": 0.0}
    monkeypatch.setattr(oprd.compare.probe, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def slow_teacher(micro):
        if micro.index is not None:
            clock["now"] += 1.5

    probe = _probe(budget_s=5.0)
    _fit(tmp_path, probe, steps=50, hooks=[("teacher", slow_teacher)])
    assert probe.train_s <= 5.0 and len(probe.step_s) >= 1
    assert probe.rows[-1]["train_s"] == probe.train_s


def test_a_time_budget_is_kept_when_the_steps_grow_dearer(tmp_path, monkeypatch):
    # Three 1-second steps, then 3-second ones (a warm start that turns on-policy): the median of the steps so far
    # (1 s) would let the fifth step start at 6 of 7 seconds and end at 9.
    clock, costs = {"now": 0.0}, iter([1.0, 1.0, 1.0] + [3.0] * 20)
    monkeypatch.setattr(oprd.compare.probe, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def dearer_teacher(micro):
        if micro.index is not None:
            clock["now"] += next(costs)

    probe = _probe(budget_s=7.0)
    _fit(tmp_path, probe, steps=20, hooks=[("teacher", dearer_teacher)])
    assert probe.train_s == 6.0  # three 1-second steps and one of 3 s; a fifth would end at 9


def test_progress_lines_name_the_run_the_step_and_the_time_left(tmp_path, caplog):
    probe = _probe(name="run 2 of 3: oprd-lr0.01")
    probe.every = 2
    with caplog.at_level(logging.INFO, logger="oprd"):
        _fit(tmp_path, probe, steps=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compare: run 2 of 3")]
    assert len(lines) == 2 and "step 2 of 4" in lines[0] and "step 4 of 4" in lines[1]
    assert all(" left" in line for line in lines)


def _chosen(selection: dict[tuple[str, float], dict], select: str = "reverse_kl", diverged: dict | None = None) -> dict:
    """`choose` over made-up runs: (objective, lr) -> final selection-split scores (the test split scores 1.0)."""
    lrs = {}
    for objective, lr in selection:
        lrs.setdefault(objective, []).append(lr)
    settings = CompareSettings(configs=["x.yaml"], objectives=list(lrs), lrs=lrs, select=select)
    rows, runs = [], []
    for (objective, lr), scores in selection.items():
        rows += [{"objective": objective, "lr": lr, "step": 0, "split": s, "reverse_kl": 9.0} for s in SPLITS]
        rows.append({"objective": objective, "lr": lr, "step": 4, "split": "selection", **scores})
        rows.append({"objective": objective, "lr": lr, "step": 4, "split": "test", "reverse_kl": 1.0})
        stop = (diverged or {}).get((objective, lr))
        why = {"step": stop, "why": "the token-space term is not finite"}
        runs.append({"objective": objective, "lr": lr, "update_s": 1.0, "update_mib": 2.0, "train_s": 3.0,
                     "diverged": None if stop is None else why})  # fmt: skip
    return {"summary": choose(rows, runs, settings), "rows": rows, "runs": runs}


SPLITS = ("selection", "test")


def _table_text(result: dict) -> str:
    """The printed table and its caption, with the caption's line wrapping undone."""
    console = Console(record=True, width=120)
    print_table(result, console)
    return " ".join(console.export_text().split())


def test_a_single_rate_is_captioned_as_given_and_a_grid_as_chosen():
    result = _chosen({("oprd", 1e-3): {"reverse_kl": 0.5}, ("oprd", 3e-3): {"reverse_kl": 0.4},
                      ("opd", 1e-5): {"reverse_kl": 0.7}})  # fmt: skip
    entries = result["summary"]["objectives"]
    assert (entries["oprd"]["lr"], entries["oprd"]["how"]) == (3e-3, "chosen")
    assert (entries["opd"]["lr"], entries["opd"]["how"]) == (1e-5, "given")
    text = _table_text(result)
    assert "oprd: lr chosen by reverse_kl on the selection split of 1e-3, 3e-3" in text
    assert "opd: lr given (one rate, not tuned)" in text and "opd: lr chosen" not in text
    assert "at the learning rate chosen on the selection split" not in text  # not every objective's was


def test_a_tie_is_broken_by_the_other_metric_and_the_table_says_so():
    result = _chosen({("oprd", 1e-3): {"reverse_kl": 0.5, "accuracy": 0.25},
                      ("oprd", 3e-3): {"reverse_kl": 0.5, "accuracy": 0.75},
                      ("oprd", 1e-2): {"reverse_kl": 0.9, "accuracy": 1.0}})  # fmt: skip
    entry = result["summary"]["objectives"]["oprd"]
    assert (entry["lr"], entry["how"]) == (3e-3, "chosen")
    assert entry["note"] == "reverse_kl tied at 0.5 between 1e-3, 3e-3; broken by accuracy (0.75)"
    by_accuracy = _chosen({("opd", 1e-3): {"accuracy": 0.5, "reverse_kl": 0.3},
                           ("opd", 3e-3): {"accuracy": 0.5, "reverse_kl": 0.2}}, select="accuracy")  # fmt: skip
    assert by_accuracy["summary"]["objectives"]["opd"]["lr"] == 3e-3
    assert "broken by accuracy" in _table_text(result)


def test_a_nan_score_or_a_diverged_run_is_never_chosen():
    nan = float("nan")
    entry = _chosen({("oprd", 1e-2): {"reverse_kl": nan}, ("oprd", 1e-3): {"reverse_kl": 0.5},
                     ("oprd", 3e-3): {"reverse_kl": 0.6}})["summary"]["objectives"]["oprd"]  # fmt: skip
    assert (entry["lr"], entry["how"]) == (1e-3, "chosen")
    accuracy = _chosen({("oprd", 1e-2): {"accuracy": nan}, ("oprd", 1e-3): {"accuracy": 0.0}}, select="accuracy")
    assert accuracy["summary"]["objectives"]["oprd"]["lr"] == 1e-3
    # A diverged run's last selection score is of weights from before it diverged: not a result to choose.
    diverged = _chosen({("oprd", 1e3): {"reverse_kl": 0.1}, ("oprd", 1e-3): {"reverse_kl": 0.5}},
                       diverged={("oprd", 1e3): 2})  # fmt: skip
    entry = diverged["summary"]["objectives"]["oprd"]
    assert (entry["lr"], entry["diverged"]) == (
        1e-3,
        [{"lr": 1e3, "step": 2, "why": "the token-space term is not finite"}],
    )
    nothing = _chosen({("opd", 1e-2): {"reverse_kl": nan}, ("opd", 1e3): {}}, diverged={("opd", 1e3): 1})
    entry = nothing["summary"]["objectives"]["opd"]
    assert (entry["lr"], entry["how"], entry["test"]) == (None, "none", {})
    assert entry["note"] == "1e-2 scored no reverse_kl; 1e3 diverged at step 1"
    assert "opd: no rate to report (1e-2 scored no reverse_kl; 1e3 diverged at step 1)" in _table_text(nothing)


def test_a_diverging_rate_is_recorded_with_its_step_and_the_comparison_goes_on(tmp_path):
    (tmp_path / "runs.jsonl").write_text('{"run": "an earlier comparison"}\n')
    main([
        "compare", "--config", str(ROOT / "configs/tiny.yaml"), "--objectives", "oprd", "--lr", "3e-3", "1e3",
        "--steps", "3", "--eval_prompts", "4", "--out", str(tmp_path),
        "--", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    result = json.loads((tmp_path / "compare.json").read_text())
    diverged = {run["lr"]: run["diverged"] for run in result["runs"]}
    assert diverged[3e-3] is None and 1 <= diverged[1e3]["step"] <= 3 and "not finite" in diverged[1e3]["why"]
    entry = result["summary"]["objectives"]["oprd"]
    assert (entry["lr"], entry["how"], entry["steps"]) == (3e-3, "chosen", 3)
    assert entry["diverged"] == [{"lr": 1e3, **diverged[1e3]}]
    assert not list(tmp_path.glob("**/*.ckpt"))  # the guard's checkpoint to resume from: compare resumes nothing
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    (earlier,) = tmp_path.glob("runs-earlier-*.jsonl")  # the earlier comparison's record, kept aside
    assert earlier.read_text() == '{"run": "an earlier comparison"}\n'


def test_two_objectives_of_one_name_or_a_rate_given_twice_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "obj.yaml").write_text("model:\n  objective: {hidden_weight: 1.0}\n")
    a, b = str(tmp_path / "a/obj.yaml"), str(tmp_path / "b/obj.yaml")
    with pytest.raises(ValueError, match=r"--objectives .*a/obj.yaml and .*b/obj.yaml are all named 'obj'"):
        CompareSettings(configs=["x.yaml"], objectives=[a, b])
    with pytest.raises(ValueError, match="--objectives opd and opd are all named 'opd'"):
        CompareSettings(configs=["x.yaml"], objectives=["opd", "opd"])
    with pytest.raises(ValueError, match=r"--lr gives oprd the rate\(s\) \[0.001\] more than once"):
        CompareSettings(configs=["x.yaml"], objectives=["oprd"], lrs={"*": [1e-3, 1e-3]})
    assert CompareSettings(configs=["x.yaml"], objectives=[a, "opd"]).objectives == ["obj", "opd"]


def test_an_installed_wheel_finds_its_objective_fragments_outside_a_checkout(tmp_path):
    # Built from a copy of the package alone: what `pip install oprd` gets, without the repository's configs/.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "oprd", source / "oprd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, source], check=True)
    (wheel,) = tmp_path.glob("oprd-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    assert {f"oprd/compare/objectives/{n}.yaml" for n in ("oprd", "opd", "opd_topk", "mix")} <= shipped
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    code = "from oprd.compare.runner import fragment; print(fragment('opd'))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == tmp_path / "site/oprd/compare/objectives/opd.yaml"
    assert (ROOT / "configs/opd.yaml").read_text() == Path(found.stdout.strip()).read_text()  # configs/ still works


def _refused(tmp_path, match: str, **settings) -> None:
    """`compare` refuses these settings before its first run, leaving an earlier comparison in --out as it was."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "runs.jsonl").write_text('{"run": "an earlier comparison"}\n')
    settings = {"configs": [str(ROOT / "configs/tiny.yaml")], "objectives": ["oprd"], "out": out, **settings}
    with pytest.raises((ValueError, argparse.ArgumentError), match=match):
        compare(CompareSettings(**settings), CliFits())
    assert sorted(p.name for p in out.iterdir()) == ["runs.jsonl"]
    assert (out / "runs.jsonl").read_text() == '{"run": "an earlier comparison"}\n'


def test_a_mistyped_config_or_prompt_source_is_refused_before_out_is_touched(tmp_path):
    _refused(tmp_path, "tiny.yml", configs=[str(ROOT / "configs/tiny.yml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_wieght: 1.0\n")
    _refused(tmp_path, "hidden_wieght", objectives=["oprd", str(bad)])
    _refused(
        tmp_path, "--final_heldout arithmetic-rephrasd: .*neither a built-in", final_heldout=["arithmetic-rephrasd"]
    )
    _refused(tmp_path, "Cannot read prompt file .*nope.jsonl", extra=["--data.val", str(tmp_path / "nope.jsonl")])


def test_too_few_held_out_prompts_or_accuracy_without_answers_are_refused_with_what_is_wrong(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "What is 2 plus 2?", "answer": "4"}\n')
    too_few = "at least 2 held-out prompts .* and data.val .*one.jsonl holds 1: add prompts to it"
    _refused(tmp_path, too_few, extra=["--data.val", str(one)])
    _refused(tmp_path, "and data.num_val is 1: raise it", extra=["--data.num_val", "1"])
    _refused(tmp_path, "and there are none: add `-- --data.val", extra=["--data.train", str(one)])
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text('{"prompt": "Say hi."}\n{"prompt": "What is 2 plus 2?", "answer": "4"}\n{"prompt": "Hi?"}\n')
    no_answers = r"--select accuracy needs answers, and none of the 2 selection prompts .*unanswered.jsonl"
    _refused(tmp_path, no_answers, select="accuracy", extra=["--data.val", str(unanswered)])
    assert not list((tmp_path / "out").glob("oprd*"))
