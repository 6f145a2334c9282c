"""Multi-process training on CPU with gloo: DDP and FSDP2 give the single-process result.

Every multi-process run is a subprocess (Lightning re-launches the command once per rank) with a timeout. Both sides
of every comparison run in float64 and agree to `EXACT_RTOL` of each tensor's scale (tests/helpers.py derives it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oprd.evaluation.scoring import score
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from tests.helpers import EXACT, ROOT, assert_same_state
from tests.parallel.distributed_worker import specs, train

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("distributed")

OPRD = Path(sys.executable).parent / "oprd"
TIMEOUT = 600
# Response tokens per sequence of the two replayed steps. With 2 ranks x 2 micro-batches of 2 sequences, micro-batch
# m of rank r holds chunk 2m + r (sequences 4m + 2r and 4m + 2r + 1).
LENGTHS = ([1, 2, 1, 3, 2, 1, 10, 10], [10, 2, 9, 1, 4, 10, 2, 6])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def _worker(out: Path, rollouts: Path, *flags: str) -> dict:
    command = [sys.executable, "-m", "tests.parallel.distributed_worker", "--out", str(out), "--rollout", str(rollouts)]
    _run([*command, "--dtype", EXACT, *flags], ROOT)
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    """Two steps of 8 sequences with unequal response lengths (as if EOS came early), saved for the workers."""
    base = DistillModule(**specs())
    steps = []
    for step, lengths in enumerate(LENGTHS):
        roll = base.distiller.sample(
            [f"What is {i} plus {i + step + 1}?" for i in range(8)], RolloutConfig(10), seed=step
        )
        keep = torch.arange(roll.input_ids.shape[1]) < roll.prompt_length + torch.tensor(lengths)[:, None]
        roll.response_mask *= keep
        roll.attention_mask *= keep
        steps.append(roll)
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.pt"
    torch.save({"steps": steps}, path)
    return path


def _reference(tmp_path_factory, rollouts: Path, **kwargs) -> dict:
    out = tmp_path_factory.mktemp("single")
    train(out, rollouts, dtype=EXACT, **kwargs)  # one process, the whole step in one micro-batch
    return torch.load(out / "result.pt", weights_only=False)


def _assert_same_training(reference: dict, result: dict) -> None:
    assert len(result["grads"]) == len(reference["grads"]) == len(LENGTHS)
    for ref, got in zip(reference["grads"], result["grads"], strict=True):
        assert_same_state(got, ref, "gradient")
    assert_same_state(result["weights"], reference["weights"], "weight")


@pytest.fixture(scope="module")
def reference(rollouts, tmp_path_factory) -> dict:
    return _reference(tmp_path_factory, rollouts)


@pytest.mark.parametrize("shard_teacher", [False, True], ids=["ddp", "ddp-sharded-teacher"])
def test_ddp_gradient_is_the_single_process_gradient_of_the_whole_batch(rollouts, reference, tmp_path, shard_teacher):
    """Global normalisation across ranks and micro-batches (every token weighs the same), on 2 gloo processes.

    Step 0 gives rank 0 6 response tokens (micro-batches of 3 and 3) and rank 1 24 (4 and 20): a per-rank or
    per-micro-batch mean would weight rank 0's tokens 4x more than rank 1's. Dividing each rank's token sum by the
    all-reduced count of the whole step (30) must give, after DDP's gradient averaging, exactly the single-process
    gradient of all 8 sequences in one micro-batch, at both steps, and the same weights after them. (Normalising
    per rank instead fails this test with a relative gradient error of 1.5.) The second case shards the frozen
    teacher with FSDP2 under DDP, which must not change anything either.
    """
    per_rank = [sum(LENGTHS[0][i] for i in (0, 1, 4, 5)), sum(LENGTHS[0][i] for i in (2, 3, 6, 7))]
    assert per_rank == [6, 24]
    flags = ["--strategy", "ddp", "--devices", "2", "--accumulate", "2"] + ["--shard-teacher"] * shard_teacher
    result = _worker(tmp_path, rollouts, *flags)
    assert not result["sharded"]["student"] and result["sharded"]["teacher"] == shard_teacher
    _assert_same_training(reference, result)


def test_ddp_standardised_loss_uses_the_moments_of_the_whole_step(rollouts, tmp_path_factory, tmp_path):
    """`standardized_mse` divides by the teacher's running standard deviation: every rank must update it with every
    rank's response tokens, so that 2 processes standardise, and so train, exactly as one process on the whole batch
    (with per-rank moments the ranks disagree and this test fails)."""
    reference = _reference(tmp_path_factory, rollouts, hidden_kind="standardized_mse")
    result = _worker(tmp_path, rollouts, "--strategy", "ddp", "--devices", "2", "--hidden-kind", "standardized_mse")
    _assert_same_training(reference, result)  # the weights include the moments
    count = "objective.moments.1_3.count"
    assert result["weights"][count] == reference["weights"][count] == sum(map(sum, LENGTHS))


def test_fsdp2_shards_and_matches_single_process_and_its_checkpoint_loads(rollouts, tmp_path_factory, tmp_path):
    """FSDP2 (`fsdp2`, Lightning's ModelParallelStrategy) on 2 gloo processes, with the teacher sharded too and a
    token-space term (which reads the LM head outside the forward): each rank holds about half of the student, the
    gradients and weights equal the single-process run's, and the gathered checkpoint loads into one process."""
    reference = _reference(tmp_path_factory, rollouts, token_loss=True)
    result = _worker(
        tmp_path,
        rollouts,
        "--strategy",
        "fsdp2",
        "--devices",
        "2",
        "--accumulate",
        "2",
        "--shard-teacher",
        "--token-loss",
    )
    assert result["sharded"]["student"] and result["sharded"]["teacher"]
    total = sum(v.numel() for k, v in result["weights"].items() if k.startswith("student."))
    assert result["sharded"]["local_numel"] < 0.6 * total
    _assert_same_training(reference, result)

    restored = DistillModule.load_from_checkpoint(tmp_path / "final.ckpt", weights_only=False)
    assert not any("teacher" in k for k in restored.state_dict())
    for name, weight in result["weights"].items():
        assert torch.equal(restored.state_dict()[name], weight), name
    metrics, _ = score(restored.distiller, ["What is 1 plus 2?", "What is 3 plus 4?"], [None, None])
    assert torch.isfinite(metrics["reverse_kl"]) and torch.isfinite(metrics["hidden"])


def _fit(root: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [str(OPRD), "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "4"]
    command += ["--model.rollout.do_sample", "false", "--model.rollout.num_generations", "1"]
    command += ["--trainer.limit_val_batches", "0"]
    command += ["--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *flags]
    root.mkdir(parents=True, exist_ok=True)
    return _run(command, root)


def test_oprd_fit_with_ddp_on_two_processes_matches_one_process(tmp_path):
    """`oprd fit` on the tiny config: 2 gloo processes x 2 prompts per step equal 1 process x 4 prompts after 4 steps.

    What makes the comparison meaningful: the rollouts are greedy (`do_sample: false`). Sampled rollouts are seeded
    per (step, rank), so 2 ranks draw different responses than 1 rank and no weight comparison could hold; greedy
    responses depend only on the prompts and the student's weights. The data sampler gives rank r every other
    prompt of the shuffled order, so the two ranks' prompts are exactly the single process's batch. Everything else
    is the real pipeline: rollout, teacher and student passes, the loss, the all-reduced token count, DDP's gradient
    averaging, AdamW with the warm-up/cosine schedule, and the checkpoint.
    """
    exact = ("--model.teacher.dtype", EXACT, "--model.student.dtype", EXACT)
    _fit(tmp_path / "one", "--trainer.devices", "1", "--data.batch_size", "4", *exact)
    two = _fit(
        tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2", *exact
    )
    assert "MEMBER: 2/2" in two.stdout + two.stderr
    one_state, two_state = (
        torch.load(tmp_path / run / "checkpoints/last.ckpt", weights_only=False)["state_dict"] for run in ("one", "two")
    )
    initial = DistillModule(**specs(EXACT)).state_dict()
    moved = max((one_state[k] - initial[k]).abs().max() for k in one_state)
    assert moved > 1e-3  # the runs trained: equality is not vacuous
    assert_same_state(two_state, one_state, "weight")
