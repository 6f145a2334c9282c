"""Long-run memory: resident set size (RSS) after every step of a real `oprd fit` on the tiny config.

A training loop that keeps a reference to anything per step (captured hidden states, logged tensors, rollouts) grows
without bound; a hook loop that never released its captures was once seen growing ~70 MB per step on SmolLM2. This
runs `oprd fit --config configs/tiny.yaml` in-process for `--steps` steps (validation and checkpoints included, as
configured), records RSS after each optimizer step, and reports the growth after warm-up: the median RSS of the last
quarter of the steps over the median of the quarter that follows warm-up (medians: the allocator holds a few MiB for
a while now and then, which a single reading would mistake for growth). Flat means at most 1%.

    .venv/bin/python -m benchmarks.memory_growth [--quick] [--steps 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning as L
import psutil

from benchmarks.common import (
    DEFAULT_OUT,
    add_threads_argument,
    apply_threads,
    markdown_table,
    metadata,
    pick_device,
    pyplot,
    quiet,
    write_json,
)
from oprd.cli import main as oprd_main

NAME = "memory_growth"
ROOT = Path(__file__).resolve().parents[1]
LIMIT_PCT = 1.0


class RSSPerStep(L.Callback):
    """Records the process's RSS (MiB) after every optimizer step, in `RSSPerStep.rows` (one run per process)."""

    rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RSSPerStep.rows.append({"step": trainer.global_step, "rss_mib": psutil.Process().memory_info().rss / 2**20})


def growth(rows: list[dict], warmup: int) -> dict:
    """Median RSS of the quarter of the steps right after warm-up and of the last quarter, and the growth between."""
    after = [r["rss_mib"] for r in rows if r["step"] > warmup]
    window = max(len(rows) // 4, 1)
    start, end = statistics.median(after[:window]), statistics.median(after[-window:])
    return {
        "warmup_steps": warmup,
        "rss_after_warmup_mib": start,
        "rss_end_mib": end,
        "growth_after_warmup_pct": 100 * (end - start) / start,
        "limit_pct": LIMIT_PCT,
    }


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in rows], [r["rss_mib"] for r in rows], marker=".", markersize=3)
    ax.axvline(summary["warmup_steps"], color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("resident set size (MiB)")
    ax.set_title(f"oprd fit, tiny config: {summary['growth_after_warmup_pct']:+.2f}% after warm-up", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 steps (about a minute)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of the steps that count as warm-up")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 60
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    quiet()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv holds this script's flags
    with tempfile.TemporaryDirectory() as root:
        oprd_main([
            "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", str(args.steps),
            "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks+=benchmarks.memory_growth.RSSPerStep",
        ])  # fmt: skip
    # Run as `python -m`, this file is `__main__`; the CLI instantiated the callback of the imported module.
    rows = importlib.import_module("benchmarks.memory_growth").RSSPerStep.rows
    summary = growth(rows, int(args.warmup * args.steps))
    print(markdown_table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"]))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, NAME, summary, rows, meta={**metadata(pick_device("cpu")), "settings": settings})
    plot(rows, summary, args.out / f"{NAME}.png")
    print(f"\nwrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.png')}")
    return summary


if __name__ == "__main__":
    main()
