"""Quality of hidden-state vs logit distillation: OPRD, OPD exact, OPD top-16 and the mix (issue 5, part 3).

For each pair, every method starts from the same student weights and trains with Lightning on the same prompts in
the same order, with the same rollout seeds, number of steps and learning-rate schedule. Every `--eval-every` steps
the student answers held-out arithmetic prompts greedily and `DistillModule.evaluate` scores the responses:
teacher-scored exact reverse KL (full vocabulary), exact-match accuracy, repetition and distinct-4. The mean
per-layer cosine to the teacher is measured through one shared evaluation module whose projectors stay at their
initialisation (identity for equal widths), so it means the same for every method, including OPD, which has none.
Wall-clock counts training steps only (evaluation excluded) and is compared as ratios within one run.

Pairs: `arith` (the arithmetic-specialised SmolLM2 teacher -> plain SmolLM2: held-out accuracy is the judge) and
`pruned` (SmolLM2 -> its 15-layer every-other-layer copy: held-out KL and repetition). `--models tiny` swaps in
tiny random models (seconds; what `--quick` uses) to check the plumbing, not the quality.

    .venv/bin/python -m benchmarks.compare [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

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
from benchmarks.setups import build_module, make_pair, share_models
from oprd.data import PromptDataModule, arithmetic_examples, collate
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig

NAME = "compare"
PAIRS = ["arith", "pruned"]
METHODS = ["oprd", "opd", "opd_top16", "mix"]
# Per-pair learning rates: the quickstart's for the arithmetic pair, DESIGN.md's measured run for the pruned one.
LEARNING_RATES = {"arith": 1e-5, "pruned": 1e-4}
METRICS = ["reverse_kl", "accuracy", "cos", "repetition", "distinct_4", "response_length"]


# ---- evaluation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(evaluator: DistillModule, student: DistillModule, items: list[dict], batch_size: int) -> dict:
    """Held-out metrics of `student`'s weights, scored by the shared `evaluator` (its teacher and projectors)."""
    share_models(evaluator, student)
    sums: dict[str, float] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        metrics = evaluator.evaluate(collate(chunk), "val")
        cos = [float(v) for k, v in metrics.items() if k.startswith("val/cos/")]
        values = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if not k.startswith("val/cos/")}
        if cos:
            values["cos"] = sum(cos) / len(cos)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(chunk)
    return {key: value / len(items) for key, value in sums.items()}


class EvalEvery(L.Callback):
    """Evaluate every `every` optimizer steps and time the training steps alone (evaluation excluded).

    Args:
        evaluator: the shared evaluation module.
        items: held-out prompts with answers.
        every: steps between evaluations.
        batch_size: prompts per evaluation batch.
        initial: the step-0 row (the same for every method: same weights, greedy decoding), reused.
    """

    def __init__(self, evaluator: DistillModule, items: list[dict], every: int, batch_size: int, initial: dict):
        self.evaluator, self.items, self.every, self.batch_size = evaluator, items, every, batch_size
        self.rows = [{**initial, "step": 0, "train_s": 0.0, "train_loss": None}]
        self.train_s, self.started, self.train_loss = 0.0, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_s += time.perf_counter() - self.started
        self.train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            metrics = evaluate(self.evaluator, pl_module, self.items, self.batch_size)
            self.rows.append({**metrics, "step": step, "train_s": self.train_s, "train_loss": self.train_loss})


# ---- one training run -----------------------------------------------------------------------------------------


def train(pair_name: str, method: str, evaluator: DistillModule, initial: dict, args) -> list[dict]:
    """Train one method on one pair from the shared initial student; return its evaluation rows."""
    pair = make_pair(pair_name, args.models)
    rollout = RolloutConfig(max_new_tokens=args.response_tokens, temperature=1.0)
    lr = args.lr or LEARNING_RATES[pair_name]
    optim = OptimConfig(lr=lr, warmup_steps=args.warmup_steps, schedule=args.schedule)
    L.seed_everything(args.seed, verbose=False)
    module = build_module(pair, method, rollout, optim, seed=args.seed, val_max_new_tokens=args.eval_tokens)
    module.frozen_teacher = evaluator.frozen_teacher  # one teacher in memory for every run
    callback = EvalEvery(evaluator, val_items(args), args.eval_every, args.eval_batch, initial)
    trainer = L.Trainer(
        accelerator=pick_device(args.device).type,
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, PromptDataModule(train="arithmetic", batch_size=args.batch, seed=args.seed))
    return [{"pair": pair_name, "method": method, "lr": lr, **row} for row in callback.rows]


def val_items(args) -> list[dict]:
    return arithmetic_examples("val")[: args.eval_prompts]


def run_pair(pair_name: str, args) -> list[dict]:
    """Every method on one pair, evaluated by one shared evaluation module."""
    pair = make_pair(pair_name, args.models)
    rollout = RolloutConfig(max_new_tokens=args.response_tokens)
    evaluator = build_module(pair, "oprd", rollout, seed=args.seed, val_max_new_tokens=args.eval_tokens)
    evaluator.to(pick_device(args.device))
    initial_student = evaluator.student
    start = time.perf_counter()
    initial = evaluate(evaluator, evaluator, val_items(args), args.eval_batch)
    print(f"[{pair_name}] step 0: {fmt(initial)} ({time.perf_counter() - start:.0f} s)")
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        method_rows = train(pair_name, method, evaluator, initial, args)
        for row in method_rows[1:]:
            print(f"[{pair_name}] {method:>9} step {row['step']:>3}: {fmt(row)}")
        print(f"[{pair_name}] {method} done in {time.perf_counter() - start:.0f} s wall-clock")
        rows += method_rows
        evaluator.student = initial_student
    return rows


def fmt(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.3f}" for k in METRICS if row.get(k) is not None)


# ---- summary, table, plot -------------------------------------------------------------------------------------


def seconds_to(rows: list[dict], target: float) -> float | None:
    """Training seconds until the held-out reverse KL first reaches `target`, or None if it never does."""
    hits = [row["train_s"] for row in rows if row["reverse_kl"] <= target]
    return min(hits) if hits else None


def summarize(rows: list[dict], args) -> dict:
    """Per pair: each method's final metrics and time to the target KL; OPRD over OPD ratios."""
    summary: dict = {}
    for pair_name in args.pairs:
        pair_rows = [r for r in rows if r["pair"] == pair_name]
        if not pair_rows:
            continue
        initial = pair_rows[0]
        target = args.target_kl if args.target_kl is not None else args.target_fraction * initial["reverse_kl"]
        methods = {}
        for method in args.methods:
            curve = [r for r in pair_rows if r["method"] == method]
            final = curve[-1]
            methods[method] = {
                **{f"final_{k}": final.get(k) for k in METRICS},
                "best_reverse_kl": min(r["reverse_kl"] for r in curve),
                "train_s": final["train_s"],
                "seconds_to_target": seconds_to(curve, target),
            }
        entry = {
            "initial_reverse_kl": initial["reverse_kl"],
            "initial_accuracy": initial.get("accuracy"),
            "target_kl": target,
            "methods": methods,
        }
        if "oprd" in methods and "opd" in methods:
            oprd, opd = methods["oprd"], methods["opd"]
            entry["oprd_over_opd_final_kl"] = ratio(oprd["final_reverse_kl"], opd["final_reverse_kl"])
            entry["oprd_over_opd_train_time"] = ratio(oprd["train_s"], opd["train_s"])
            entry["oprd_over_opd_seconds_to_target"] = ratio(oprd["seconds_to_target"], opd["seconds_to_target"])
        summary[pair_name] = entry
    return summary


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Learning curves: rows are pairs; columns held-out KL vs step and vs training seconds, accuracy, cosine,
    repetition."""
    plt = pyplot()
    pairs = list(summary)
    columns = [("step", "reverse_kl"), ("train_s", "reverse_kl"), ("step", "accuracy"), ("step", "cos")]
    columns.append(("step", "repetition"))
    fig, axes = plt.subplots(len(pairs), len(columns), figsize=(20, 3.6 * len(pairs)), squeeze=False)
    for i, pair_name in enumerate(pairs):
        for j, (x, y) in enumerate(columns):
            ax = axes[i][j]
            for method in summary[pair_name]["methods"]:
                curve = [r for r in rows if r["pair"] == pair_name and r["method"] == method and r.get(y) is not None]
                ax.plot([r[x] for r in curve], [r[y] for r in curve], marker="o", markersize=3, label=method)
            if y == "reverse_kl":
                ax.axhline(summary[pair_name]["target_kl"], color="grey", linestyle=":", linewidth=1)
                ax.set_yscale("log")
            ax.set_xlabel("training seconds (ratios only)" if x == "train_s" else "step")
            ax.set_title(f"{pair_name}: held-out {y}", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["pair", "method", "step", "train_s", "train_loss", *METRICS]


def print_report(rows: list[dict], summary: dict) -> None:
    print(markdown_table(rows, COLUMNS))
    for pair_name, entry in summary.items():
        print(f"\n{pair_name}: initial KL {entry['initial_reverse_kl']:.3f}, target KL {entry['target_kl']:.3f}")
        table = [{"method": m, **values} for m, values in entry["methods"].items()]
        print(markdown_table(table, ["method", *[k for k in table[0] if k != "method"]]))
        print({k: v for k, v in entry.items() if k.startswith("oprd_over")})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, 2 steps: under a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--models", choices=["smollm2", "tiny"], help="real SmolLM2 pairs (default) or tiny random")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=PAIRS, help="teacher/student pairs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="methods to compare")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--response-tokens", type=int, default=32, help="rollout length")
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-5 arith, 1e-4 pruned)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (of 100)")
    parser.add_argument("--eval-tokens", type=int, default=16, help="greedy response length at evaluation")
    parser.add_argument("--eval-batch", type=int, default=32, help="prompts per evaluation batch")
    parser.add_argument("--target-kl", type=float, help="held-out KL to time (default: --target-fraction of step 0)")
    parser.add_argument("--target-fraction", type=float, default=0.5, help="target KL as a fraction of step 0's")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, rollouts and initialisation")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or "tiny"
        args.steps, args.batch, args.response_tokens, args.eval_every = 2, 2, 8, 1
        args.eval_prompts, args.eval_tokens = 8, 8
    args.models = args.models or "smollm2"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    quiet()
    start = time.perf_counter()
    rows = [row for pair_name in args.pairs for row in run_pair(pair_name, args)]
    summary = summarize(rows, args)
    summary["wall_clock_s"] = time.perf_counter() - start
    print_report(rows, {k: v for k, v in summary.items() if k in args.pairs})
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, NAME, summary, rows, meta={**metadata(pick_device(args.device)), "settings": settings})
    plot(rows, {k: v for k, v in summary.items() if k in args.pairs}, args.out / f"{NAME}.png")
    print(f"\nwrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.png')}")
    return summary


if __name__ == "__main__":
    main()
