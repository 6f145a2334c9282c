"""The benchmark scripts run end to end in their --quick modes and write a summary JSON and a plot.

Each script runs once per test session (a module-scoped fixture); the tests then read its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.peers import QUICK_RATES, RATES, parse_rates
from tests.helpers import ROOT

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("benchmarks")

# One torch thread: on a busy 2-core CI machine two threads spin waiting for each other (20x slower on tiny models).
ARGS = {
    "loss_memory": ["--quick", "--threads", "1"],
    # Tiny random models: the real SmolLM2 --quick run takes about a minute on a shared 2-core CPU.
    "step": ["--quick", "--models", "tiny", "--threads", "1"],
    "memory_growth": ["--quick", "--threads", "1"],
    "peers": ["--quick", "--threads", "1"],
    "remote_teacher": ["--quick", "--threads", "1", "--steps", "2"],
}
SUMMARY_KEYS = {
    "loss_memory": {
        "reference",
        "oprd_hidden_mse_over_opd_rkl_dense_memory",
        "oprd_hidden_mse_over_opd_top16_dense_time",
        "opd_rkl_chunked_over_opd_rkl_dense_memory",
        "jsd_chunked_over_jsd_dense_time",
        "chunked_vs_dense_max_rel_diff",
    },
    "step": {
        "oprd_over_opd_top16_dense_memory",
        "oprd_speedup_vs_opd_top16_dense_update",
        "oprd_speedup_vs_opd_top16_dense_step",
        "oprd_over_full_teacher_memory",
        "oprd_mfu",
        "paper_memory_ratio_vs_opd_top16",
        "paper_speedup_vs_opd_top16",
    },
    "memory_growth": {"growth_after_warmup_pct", "rss_after_warmup_mib", "rss_end_mib", "warmup_steps"},
    "peers": {"opd_over_trl_step_time", "opd_over_trl_update_memory", "oprd_over_trl_update_memory", "oprd_lr"},
    "remote_teacher": {"tiny"},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run a script's --quick mode once; return its parsed JSON and the output folder."""
    cache = {}

    def get(name: str) -> tuple[dict, object]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
            done = subprocess.run(
                [sys.executable, "-m", f"benchmarks.{name}", *ARGS[name], "--out", str(out)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            cache[name] = json.loads((out / f"{name}.json").read_text()), out
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(ARGS))
def test_quick_mode_writes_summary_rows_and_plot(name, results):
    data, out = results(name)
    assert SUMMARY_KEYS[name] <= set(data["summary"]), sorted(data["summary"])
    assert data["rows"]
    assert (out / f"{name}.png").stat().st_size > 0


def test_loss_memory_chunked_matches_dense_and_needs_less_memory(results):
    summary = results("loss_memory")[0]["summary"]
    assert summary["chunked_vs_dense_max_rel_diff"] < 1e-4
    # The quick grid's largest case cuts 256 tokens into 4 chunks of 64: less memory than the full [256, v] logits.
    assert summary["reference"]["tokens"] == 256
    assert summary["opd_rkl_chunked_over_opd_rkl_dense_memory"] < 1
    assert summary["jsd_chunked_over_jsd_dense_memory"] < 1


def test_step_measures_every_quick_variant(results):
    rows = results("step")[0]["rows"]
    assert {r["variant"] for r in rows} == {"oprd", "oprd_full_teacher", "opd", "opd_top16_dense"}
    assert all(r["peak_mib"] > 0 and r["update_s"] > 0 and r["mfu"] > 0 for r in rows)
    by = {r["variant"]: r for r in rows}
    # Running the teacher to its LM head and keeping the logits can only cost memory.
    assert by["oprd_full_teacher"]["peak_mib"] >= by["oprd"]["peak_mib"]


def test_memory_stays_flat_over_a_long_fit(results):
    data = results("memory_growth")[0]
    assert [row["step"] for row in data["rows"]] == list(range(1, 61))
    assert data["summary"]["growth_after_warmup_pct"] <= data["summary"]["limit_pct"]


def test_peers_runs_trl_and_oprd_on_the_same_pair_each_at_its_own_rate_and_scores_both(results):
    data = results("peers")[0]
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == {"trl", "opd", "oprd"}
    assert all(row["steps"] == 3 and row["update_peak_mib"] > 0 and row["reverse_kl"] > 0 for row in rows.values())
    # Each method at its own rate (OPRD's an order of magnitude above OPD's, not OPD's best for all).
    assert {m: row["lr"] for m, row in rows.items()} == QUICK_RATES and all(row["chosen"] for row in rows.values())
    assert {row["memory"] for row in rows.values()} == {"update peak (CPU allocation replay)"}


def test_peers_takes_a_rate_grid_per_method_and_refuses_unknown_methods():
    assert parse_rates(["oprd=3e-5,1e-4"], RATES) == {"trl": [1e-5], "opd": [1e-5], "oprd": [3e-5, 1e-4]}
    assert parse_rates(["2e-5"], RATES) == {"trl": [2e-5], "opd": [2e-5], "oprd": [2e-5]}
    with pytest.raises(ValueError, match="'sft' is not a method"):
        parse_rates(["sft=1e-5"], RATES)
