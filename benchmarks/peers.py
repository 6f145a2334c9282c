"""oprd next to TRL: TRL's on-policy `DistillationTrainer` and oprd's OPD and OPRD, side by side in one run.

Same pair, prompts (in the same order), batch, response length, precision, learning rate and number of steps. Per
method: the median seconds per training step (rollout included), the bytes the update saves for backward (the
activation memory of the student pass and the loss, on any device), and held-out greedy
accuracy and teacher-scored reverse KL after the last step, all scored by oprd's `score` on the same prompts.

TRL's trainer samples the student's own responses and minimises the generalised JSD with beta = 1, i.e. reverse KL
over the full vocabulary (chunked), as oprd's `configs/opd.yaml` does. TRL turns activation checkpointing on by
default and oprd does not; this benchmark turns it off for TRL (`--checkpointing` turns it back on).

    .venv/bin/python -m benchmarks.peers [--quick] [--steps 16] [--batch 8] [--response-tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

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
from benchmarks.setups import build_module, make_pair
from oprd.compare.probe import evaluate
from oprd.data import arithmetic_examples, collate
from oprd.rollout import RolloutConfig
from oprd.training.optim import OptimConfig
from oprd.training.throughput import SavedBytes

NAME = "peers"
METHODS = ["trl", "opd", "oprd"]


class StepProbe(L.Callback):
    """Seconds per training step and bytes saved for backward by each step's forward (oprd's runs)."""

    def __init__(self) -> None:
        self.seconds, self.saved, self._stack, self._start = [], [], contextlib.ExitStack(), 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        self.counter = SavedBytes([*module.parameters(), *module.pair.teacher.parameters()])
        self._stack.enter_context(self.counter.track())

    def on_before_backward(self, trainer, module, loss) -> None:
        self._stack.close()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._stack.close()
        self.seconds.append(time.perf_counter() - self._start)
        self.saved.append(self.counter.total / 2**20)


def train_oprd(method: str, pair, items: list[dict], args) -> tuple[object, StepProbe]:
    rollout = RolloutConfig(max_new_tokens=args.response_tokens, temperature=1.0)
    optim = OptimConfig(lr=args.lr, schedule="constant")
    module = build_module(pair, method, rollout, optim, seed=args.seed, val_max_new_tokens=args.eval_tokens)
    probe = StepProbe()
    trainer = L.Trainer(
        accelerator=pick_device(args.device).type, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(module, DataLoader(items, batch_size=args.batch, shuffle=False, collate_fn=collate))
    return module, probe


def train_trl(scorer, items: list[dict], args) -> tuple[object, dict]:
    """TRL's DistillationTrainer on `scorer`'s student and teacher (copies), same prompts in the same order."""
    import copy

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    seconds, saved = [], []

    class Probed(DistillationTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            start = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            seconds.append(time.perf_counter() - start)
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counter = SavedBytes([*model.parameters(), *self.teacher_model.parameters()])
            with counter.track():
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            saved.append(counter.total / 2**20)
            return out

    student = copy.deepcopy(scorer.student).train()
    for param in student.parameters():
        param.requires_grad_(True)
    tokenizer = copy.deepcopy(scorer.pair.tokenizer)
    tokenizer.padding_side = "left"  # TRL's generation needs it; the copy keeps oprd's tokenizer as it is
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": item["prompt"]}]} for item in items])
    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, max_completion_length=args.response_tokens, temperature=1.0,
            beta=1.0, shuffle_dataset=False, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed,
            use_cpu=pick_device(args.device).type == "cpu", bf16=False, dataloader_num_workers=0,
            gradient_checkpointing=args.checkpointing,
        )  # fmt: skip
        trainer = Probed(
            model=student,
            teacher_model=scorer.pair.teacher,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    return student.eval(), {"seconds": seconds, "saved": saved}


def run(args) -> tuple[list[dict], dict]:
    pair = make_pair("arith", args.models)
    items = arithmetic_examples("train", seed=args.seed)[: args.steps * args.batch]
    heldout = arithmetic_examples("val", seed=args.seed)[: args.eval_prompts]
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        if method == "trl":
            scorer = build_module(pair, "opd", RolloutConfig(max_new_tokens=args.response_tokens), seed=args.seed,
                                  val_max_new_tokens=args.eval_tokens)  # fmt: skip
            student, probe = train_trl(scorer, items, args)
            scorer.student = scorer.pair.student = student
            seconds, saved = probe["seconds"], probe["saved"]
        else:
            scorer, step_probe = train_oprd(method, pair, items, args)
            seconds, saved = step_probe.seconds, step_probe.saved
        scores = evaluate(scorer.eval(), heldout, args.eval_batch)
        rows.append({
            "method": method, "step_s": statistics.median(seconds[1:] or seconds), "update_saved_mib": max(saved),
            "steps": len(seconds), "wall_s": time.perf_counter() - start,
            **{k: scores.get(k) for k in ("accuracy", "reverse_kl", "repetition", "distinct_4")},
        })  # fmt: skip
        print(f"{method}: {rows[-1]}")
    by = {row["method"]: row for row in rows}
    summary = {}
    for method in ("opd", "oprd"):
        if method in by and "trl" in by:
            summary[f"{method}_over_trl_step_time"] = ratio(by[method]["step_s"], by["trl"]["step_s"])
            summary[f"{method}_over_trl_update_memory"] = ratio(
                by[method]["update_saved_mib"], by["trl"]["update_saved_mib"]
            )
            summary[f"{method}_accuracy"], summary["trl_accuracy"] = by[method]["accuracy"], by["trl"]["accuracy"]
    return rows, summary


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["method"] for r in rows]
    for ax, (key, title) in zip(axes, [("step_s", "seconds per step (ratios only)"),
                                       ("update_saved_mib", "update: saved for backward (MiB)"),
                                       ("accuracy", "held-out accuracy after the run")], strict=True):  # fmt: skip
        ax.bar(names, [r[key] or 0 for r in rows], color=["tab:gray", "tab:orange", "tab:blue"][: len(rows)])
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, 2 steps: a plumbing check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--models", choices=["smollm2", "tiny"], default="smollm2", help="real or tiny random models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="what to run")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps (the quickstart's)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--response-tokens", type=int, default=32, help="longest response")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of every method")
    parser.add_argument("--eval-prompts", type=int, default=50, help="held-out prompts scored after the run")
    parser.add_argument("--eval-tokens", type=int, default=24, help="greedy response length when scoring")
    parser.add_argument("--eval-batch", type=int, default=25, help="prompts per scoring batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, rollouts and initialisation")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="TRL's activation checkpointing (its default is on; oprd's runs use none)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.batch, args.response_tokens = "tiny", 2, 2, 8
        args.eval_prompts, args.eval_tokens, args.lr = 4, 8, 1e-3
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    quiet()
    rows, summary = run(args)
    print(markdown_table(rows, list(rows[0])))
    print(markdown_table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"]))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, NAME, summary, rows, meta={**metadata(pick_device(args.device)), "settings": settings})
    plot(rows, args.out / f"{NAME}.png")
    print(f"\nwrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.png')}")
    return summary


if __name__ == "__main__":
    main()
