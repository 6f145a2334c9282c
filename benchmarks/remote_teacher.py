"""The teacher in the trainer's process vs on Ray replicas: trainer memory, step time, and bytes shipped per token.

For each pair and each placement (in-process, 1 replica, 2 replicas) a fresh process builds the pair with the `fit`
CLI and trains `--steps` steps of the config's own objective, timing each step; the trainer process's peak RSS
(`ru_maxrss`: replicas are other processes, so it is what the trainer itself holds) is read at the end. A fresh
process per run keeps one run's memory out of the next. The bytes a replica ships are measured on one rollout after
training: what it returns, pickled, per response token and per sequence token (each state from the last prompt
position on; with a calibrated Bridge, each pair's rank-r coordinates instead of its states); next to them, what
rank-8 coordinates of the same layers take, and the top-64 log-probs a logit server sends (value and token id, 4
bytes each, per response token).

    .venv/bin/python -m benchmarks.remote_teacher --threads 1 [--quick] [--steps 4] [--out DIR]

`--quick` runs the tiny config (CI); the full run takes the quickstart pair (arithmetic teacher -> SmolLM2) and the
width-pruned pair (arithmetic teacher, 576 wide -> its 384-wide pruning), whose teacher is larger than the student.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

from benchmarks.common import (
    DEFAULT_OUT,
    add_threads_argument,
    apply_threads,
    markdown_table,
    metadata,
    pick_device,
    pyplot,
    quiet,
    ratio,
    write_json,
)
from oprd.objective.bridge import BridgeProjectors
from oprd.parallel.remote import first_read_position, replica_payload

NAME = "remote_teacher"
ROOT = Path(__file__).resolve().parents[1]
PAIRS = {
    "quick": {"tiny": "configs/tiny.yaml"},
    "full": {"quickstart": "configs/quickstart.yaml", "width": "configs/width.yaml"},
}
PLACEMENTS = {"in-process": 0, "remote x1": 1, "remote x2": 2}
TOP_K = 64


class StepTimes(L.Callback):
    """Seconds of every optimizer step (rollout, teacher, update)."""

    def __init__(self) -> None:
        self.seconds, self._start = [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def child(config: str, replicas: int, steps: int, threads: int) -> dict:
    """One run in this process: `steps` steps of the config, with the teacher in-process or on `replicas` replicas."""
    import torch

    from oprd.cli.fit import build_cli

    apply_threads(threads)
    threads = torch.get_num_threads()  # the replicas run with the trainer's count: the same kernels, the same numbers
    args = ["--config", str(ROOT / config), "--trainer.max_steps", str(steps), "--trainer.logger", "false"]
    args += ["--checkpoint.save_last", "false", "--trainer.limit_val_batches", "0"]
    args += ["--trainer.default_root_dir", str(Path.cwd() / "runs")]
    if replicas:
        remote = "--model.teacher_placement.remote"
        args += [f"{remote}.replicas", str(replicas), f"{remote}.threads", str(threads)]
        args += [f"{remote}.name", f"benchmark-{time.time_ns()}"]
    cli = build_cli(args)
    times = StepTimes()
    cli.trainer.callbacks[:] = [times]
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    roll = module.distiller.sample(
        next(iter(cli.datamodule.train_dataloader()))["prompt"], module.distiller.rollout, seed=0
    )
    objective, start = module.objective, first_read_position(roll)
    states = module.pair.teacher_states(roll, objective.points("teacher"))
    states = {point: state.cpu() for point, state in states.items()}
    # What a replica sends: the states from the last prompt position on, and with a calibrated Bridge each pair's
    # coordinates in its basis instead of that pair's states.
    projection = objective.teacher_projection() or {}
    projection = {label: (point, mean.cpu(), basis.cpu()) for label, (point, mean, basis) in projection.items()}
    sent = replica_payload(states, objective.sent_whole(projection), start, projection)
    payload = len(pickle.dumps(sent))
    pairs = len(objective.projectors.pairs)
    rank = objective.projectors.config.rank if isinstance(objective.projectors, BridgeProjectors) else None
    return {
        "step_s": statistics.median(times.seconds[1:]),  # the first step warms up (imports, the head's fetch)
        "steps_timed": len(times.seconds) - 1,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes_per_response_token": payload / int(roll.response_mask.sum()),
        "bytes_per_sequence_token": payload / roll.input_ids.numel(),
        "bridge_bytes_per_token": pairs * (rank or 8) * 4,
        "sends_bridge_coordinates": bool(projection),
        "topk_bytes_per_token": TOP_K * 8,
        "teacher_params": None if module.pair.remote else sum(p.numel() for p in module.pair.teacher.parameters()),
        "student_params": sum(p.numel() for p in module.student.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def run(config: str, replicas: int, steps: int, threads: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.remote_teacher", "--child", config, str(replicas), str(steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [*command, "--threads", str(threads)], cwd=folder, capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The tiny config only (seconds; CI).")
    parser.add_argument("--steps", type=int, default=4, help="Training steps per run (the median after the first).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    quiet()
    if args.child:
        config, replicas, steps = args.child
        print(json.dumps(child(config, int(replicas), int(steps), args.threads)))
        return {}
    rows = []
    for pair, config in PAIRS["quick" if args.quick else "full"].items():
        for placement, replicas in PLACEMENTS.items():
            print(f"{pair}: {placement} ...", flush=True)
            figures = run(
                config, replicas, args.steps, args.threads, args.out / NAME / pair / placement.replace(" ", "")
            )
            rows.append({"pair": pair, "placement": placement, **figures})
    summary = {}
    for pair in {row["pair"] for row in rows}:
        mine = {row["placement"]: row for row in rows if row["pair"] == pair}
        base = mine["in-process"]
        summary[pair] = {
            "trainer_memory_remote_vs_in_process": ratio(mine["remote x1"]["peak_rss_mib"], base["peak_rss_mib"]),
            "step_time_remote_x1_vs_in_process": ratio(mine["remote x1"]["step_s"], base["step_s"]),
            "step_time_remote_x2_vs_in_process": ratio(mine["remote x2"]["step_s"], base["step_s"]),
            "states_vs_topk_bytes": ratio(base["bytes_per_response_token"], base["topk_bytes_per_token"]),
        }
    columns = ["pair", "placement", "peak_rss_mib", "step_s", "bytes_per_response_token", "bytes_per_sequence_token",
               "bridge_bytes_per_token", "topk_bytes_per_token"]  # fmt: skip
    print(markdown_table(rows, columns))
    print(json.dumps(summary, indent=2))
    path = write_json(args.out, NAME, summary, rows, meta=metadata(pick_device("cpu")))
    plot(rows, args.out / f"{NAME}.png")
    print(f"wrote {path}")
    return {"summary": summary, "rows": rows}


def plot(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    pairs = sorted({row["pair"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((axes[0], "peak_rss_mib", "trainer peak RSS (MiB)"), (axes[1], "step_s", "step (s)")):
        for offset, placement in enumerate(PLACEMENTS):
            values = [next(r[key] for r in rows if r["pair"] == p and r["placement"] == placement) for p in pairs]
            axis.bar([i + offset * 0.27 for i in range(len(pairs))], values, width=0.27, label=placement)
        axis.set_xticks([i + 0.27 for i in range(len(pairs))], pairs)
        axis.set_title(label)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


if __name__ == "__main__":
    main()
