"""oprd next to TRL: TRL's on-policy `DistillationTrainer` and oprd's OPD and OPRD, side by side in one run.

Same pair, prompts (in the same order), batch, response length, precision and number of steps; each method at its own
learning rate (the objectives want rates an order of magnitude apart), or the best of its own grid (`--lr
oprd=3e-5,1e-4`), chosen on one half of the held-out prompts and reported on the other. Per method: the median
seconds per training step (rollout, update and optimizer step), the update's peak memory on one probed step (the
peak allocated after the rollout until the optimizer step is done, above what was allocated when the update began:
`oprd.training.memory`, the same measurement as `oprd compare`), and held-out greedy accuracy and teacher-scored
reverse KL after the last step, all scored by oprd's `score` on the same prompts.

TRL's trainer samples the student's own responses and minimises the generalised JSD with beta = 1, i.e. reverse KL
over the full vocabulary (chunked), as oprd's `configs/opd.yaml` does. TRL turns activation checkpointing on by
default and oprd does not; this benchmark turns it off for TRL (`--checkpointing` turns it back on).

    .venv/bin/python -m benchmarks.peers [--quick] [--steps 16] [--batch 8] [--response-tokens 32] [--lr oprd=1e-4]
"""

from __future__ import annotations

import argparse
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
from oprd.compare.probe import CompareProbe, evaluate
from oprd.data import arithmetic_examples, collate
from oprd.distiller import EvalConfig
from oprd.rollout import RolloutConfig
from oprd.training.memory import UpdateMemory
from oprd.training.optim import OptimConfig

NAME = "peers"
METHODS = ["trl", "opd", "oprd"]
RATES = {"trl": 1e-5, "opd": 1e-5, "oprd": 1e-4}
"""Each method's own rate on the quickstart pair (`benchmarks/RESULTS.md`, section 3: OPD's best 1e-5, OPRD's 1e-4;
TRL's trainer minimises OPD's loss)."""
QUICK_RATES = {"trl": 1e-3, "opd": 1e-3, "oprd": 3e-3}
"""The tiny random pair's (`configs/tiny.yaml` trains OPRD at 3e-3)."""
PROBED_STEP = 1
"""The optimizer step whose update memory is measured (the second: the optimizer state exists, nothing is first)."""


def parse_rates(items: list[str], defaults: dict[str, float]) -> dict[str, list[float]]:
    """`["3e-5", "oprd=3e-5,1e-4"]` -> each method's grid: a bare rate is every method's, `method=` one method's;
    methods not named keep their own default."""
    grids: dict[str, list[float]] = {}
    for item in items:
        name, _, values = item.partition("=") if "=" in item else ("*", "", item)
        if name not in (*METHODS, "*"):
            raise ValueError(f"--lr {item!r}: {name!r} is not a method; choose from {', '.join(METHODS)}.")
        try:
            grids.setdefault(name, []).extend(float(v) for v in values.split(",") if v)
        except ValueError as err:
            raise ValueError(f"--lr {item!r}: expected numbers (1e-5) or method=numbers (oprd=3e-5,1e-4).") from err
    return {m: grids.get(m) or grids.get("*") or [defaults[m]] for m in METHODS}


def train_oprd(method: str, lr: float, pair, items: list[dict], args) -> tuple[object, dict]:
    rollout = RolloutConfig(max_new_tokens=args.response_tokens, temperature=1.0)
    optim = OptimConfig(lr=lr, schedule="constant")
    module = build_module(
        pair, method, rollout, optim, seed=args.seed, eval=EvalConfig(max_new_tokens=args.eval_tokens)
    )
    probe = CompareProbe({}, every=args.steps, batch_size=args.eval_batch)  # the clock and the memory of compare
    trainer = L.Trainer(
        accelerator=pick_device(args.device).type, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(module, DataLoader(items, batch_size=args.batch, shuffle=False, collate_fn=collate))
    seconds = list(probe.step_s.values()) or [probe.probed[1]]
    measured = {"seconds": seconds, "peak_mib": probe.memory_mib, "memory": probe.memory_kind}
    return module, {**measured, "steps": trainer.global_step}


def train_trl(scorer, lr: float, items: list[dict], args) -> tuple[object, dict]:
    """TRL's DistillationTrainer on `scorer`'s student and teacher (copies), same prompts in the same order.

    A step is timed from its `on_step_begin` to the next one's (or the end of training): generation, loss, backward,
    optimizer step and logging, as oprd's clock counts a step. The probed step's update window opens in
    `compute_loss` (after TRL's generation) and closes after its optimizer step."""
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    starts, probed, memory = [], {}, UpdateMemory(pick_device(args.device))

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if probed.get("begun") and "peak" not in probed:  # after the probed step's optimizer step
                memory.end()
                probed["peak"] = memory.close()

        def on_train_end(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    class Probed(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.state.global_step == PROBED_STEP and not probed and model.training:
                probed["begun"] = True
                memory.begin()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    student = copy.deepcopy(scorer.student).train()
    for param in student.parameters():
        param.requires_grad_(True)
    tokenizer = copy.deepcopy(scorer.pair.tokenizer)
    tokenizer.padding_side = "left"  # TRL's generation needs it; the copy keeps oprd's tokenizer as it is
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": item["prompt"]}]} for item in items])
    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=lr,
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
            callbacks=[Clock()],
        )
        trainer.train()
    durations = [end - start for start, end in zip(starts[:-1], starts[1:], strict=True)]
    seconds = [d for step, d in enumerate(durations) if step != PROBED_STEP]
    peak = probed.get("peak")
    return student.eval(), {
        "seconds": seconds or durations,
        "peak_mib": None if peak is None else peak / 2**20,
        "memory": memory.kind if peak is not None else None,
        "steps": trainer.state.global_step,
    }


def run(args) -> tuple[list[dict], dict]:
    pair = make_pair("arith", args.models)
    items = arithmetic_examples("train", seed=args.seed)[: args.steps * args.batch]
    heldout = arithmetic_examples("val", seed=args.seed)[: args.eval_prompts]
    halves = {"selection": heldout[0::2], "test": heldout[1::2]}  # a rate is chosen on one, reported on the other
    rows = []
    for method in args.methods:
        for lr in args.rates[method]:
            start = time.perf_counter()
            if method == "trl":
                scorer = build_module(pair, "opd", RolloutConfig(max_new_tokens=args.response_tokens), seed=args.seed,
                                      eval=EvalConfig(max_new_tokens=args.eval_tokens))  # fmt: skip
                student, measured = train_trl(scorer, lr, items, args)
                scorer.student = scorer.pair.student = student
            else:
                scorer, measured = train_oprd(method, lr, pair, items, args)
            scores = {split: evaluate(scorer.eval().distiller, part, args.eval_batch) for split, part in halves.items()}
            rows.append({
                "method": method, "lr": lr, "step_s": statistics.median(measured["seconds"]),
                "update_peak_mib": measured["peak_mib"], "memory": measured["memory"], "steps": measured["steps"],
                "wall_s": time.perf_counter() - start, "selection_reverse_kl": scores["selection"].get("reverse_kl"),
                **{k: scores["test"].get(k) for k in ("accuracy", "reverse_kl", "repetition", "distinct_4")},
            })  # fmt: skip
            print(f"{method} lr={lr:g}: {rows[-1]}")
    for method in args.methods:  # each method at its best rate on the selection half
        mine = [row for row in rows if row["method"] == method]
        best = min(mine, key=lambda row: row["selection_reverse_kl"])
        for row in mine:
            row["chosen"] = row is best
    by = {row["method"]: row for row in rows if row["chosen"]}
    summary = {f"{method}_lr": row["lr"] for method, row in by.items()}
    for method in ("opd", "oprd"):
        if method in by and "trl" in by:
            summary[f"{method}_over_trl_step_time"] = ratio(by[method]["step_s"], by["trl"]["step_s"])
            summary[f"{method}_over_trl_update_memory"] = ratio(
                by[method]["update_peak_mib"], by["trl"]["update_peak_mib"]
            )
            for metric in ("accuracy", "reverse_kl"):
                summary[f"{method}_{metric}"], summary[f"trl_{metric}"] = by[method][metric], by["trl"][metric]
    summary["memory"] = " / ".join(sorted({row["memory"] for row in rows if row["memory"]}))
    return rows, summary


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    rows = [r for r in rows if r["chosen"]]
    names = [f"{r['method']} lr={r['lr']:g}" for r in rows]
    memory = " / ".join(sorted({r["memory"] for r in rows if r["memory"]}))
    for ax, (key, title) in zip(axes, [("step_s", "seconds per step (ratios only)"),
                                       ("update_peak_mib", f"MiB: {memory}"),
                                       ("accuracy", "held-out test accuracy after the run")], strict=True):  # fmt: skip
        ax.bar(names, [r[key] or 0 for r in rows], color=["tab:gray", "tab:orange", "tab:blue"][: len(rows)])
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, 3 steps: a plumbing check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--models", choices=["smollm2", "tiny"], default="smollm2", help="real or tiny random models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="what to run")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps (the quickstart's)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--response-tokens", type=int, default=32, help="longest response")
    parser.add_argument("--lr", nargs="+", default=[],
                        help="learning rates: `3e-5` for every method, `oprd=3e-5,1e-4` one method's grid (default: "
                        f"each method's own, {RATES})")  # fmt: skip
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
        args.models, args.steps, args.batch, args.response_tokens = "tiny", 3, 2, 8
        args.eval_prompts, args.eval_tokens = 4, 8
    try:
        args.rates = parse_rates(args.lr, QUICK_RATES if args.models == "tiny" else RATES)
    except ValueError as err:
        parser.error(str(err))
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
