"""Step-level time and memory of one training step, OPRD vs OPD, on a built-in SmolLM2 pair.

Shape legend:
    b  sequences (prompts)
    t  prompt + response tokens
    d  hidden width
    v  vocabulary

One student rollout is sampled (with a fixed response length) and shared by every method, so each method's update
sees the same tokens. Per method the update is timed in its two parts: the teacher pass (no grad) and the student
forward + loss + backward. Its memory is the peak increase during the update over the memory before it (the OPRD
paper's "delta peak": CUDA `max_memory_allocated`; CPU the profiler-replayed peak of live bytes, see `common`),
plus the bytes the student pass saves for backward. Methods:

* `oprd`: hidden MSE on every mapped layer; the teacher stops after its deepest mapped layer.
* `oprd_full_teacher`: the same loss, but the teacher runs to its LM head and its `[b, t, v]` logits stay alive
  through the update, as the OPRD paper's implementation did.
* `opd_dense` / `opd`: exact reverse KL with full logits / with oprd's chunked LM head.
* `opd_top16_dense` / `opd_top16`: top-16 stop-gradient reverse KL, full logits / chunked.
* `mix`: reverse KL + balanced hidden MSE.

Model FLOPs utilisation: (2 * params * tokens for the teacher forward + 6 * params * tokens for the student) per
second of update, over a dense fp32 matmul throughput measured in the same run.

    .venv/bin/python -m benchmarks.step [--quick] [--out DIR]
    .venv/bin/python -m benchmarks.step --batch 8 --response-tokens 1024 --dtype bfloat16   # the headline setting
    .venv/bin/python -m benchmarks.step --batch 8 --response-tokens 32 --no-checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import (
    DEFAULT_OUT,
    MIB,
    add_threads_argument,
    apply_threads,
    markdown_table,
    matmul_flops_per_s,
    median,
    metadata,
    peak_bytes,
    pick_device,
    pyplot,
    quiet,
    ratio,
    timed,
)
from benchmarks.common import write_json as write_results
from benchmarks.setups import PAIRS, activate, build_module, make_pair, share_models
from oprd.data import arithmetic_examples
from oprd.models import DTYPES
from oprd.models.capture import HiddenCapture, forward_inputs
from oprd.models.lora import LoraSettings
from oprd.module import DistillModule
from oprd.rollout import Rollout, RolloutConfig, get_engine
from oprd.training.throughput import SavedBytes

NAME = "step"
FULL_TEACHER = "oprd_full_teacher"
VARIANTS = ["oprd", FULL_TEACHER, "opd_dense", "opd", "opd_top16_dense", "opd_top16", "mix"]
"""The default variants; `kd` (the forward KL of configs/compress.yaml after its warm start) runs when named."""
QUICK_VARIANTS = ["oprd", FULL_TEACHER, "opd", "opd_top16_dense"]
# The OPRD paper (arXiv 2606.06021): one update step of OPRD vs OPD top-16 on GPUs.
PAPER = {"memory_ratio": 0.46, "speedup": 1.44}


# ---- the teacher pass of the paper's implementation ------------------------------------------------------------


@torch.no_grad()
def teacher_states_full(module: DistillModule, roll: Rollout) -> tuple[dict, Tensor]:
    """Teacher hidden states at the mapped layers from a full forward that also computes the `[b, t, v]` logits."""
    points, path = module.objective.points("teacher"), module.pair.layers_paths["teacher"]
    capture = HiddenCapture(module.pair.teacher, points, path, stop_early=False)
    with capture.capture() as states:
        out = module.pair.teacher(**forward_inputs(roll.input_ids, roll.attention_mask))
        return capture.collected(states), out.logits


# ---- one update -------------------------------------------------------------------------------------------------


def run_teacher(module: DistillModule, roll: Rollout, variant: str) -> tuple[dict, Tensor | None]:
    """The variant's teacher pass: its states, and the full logits when it runs to the LM head (else None)."""
    if variant == FULL_TEACHER:
        return teacher_states_full(module, roll)
    return module.pair.teacher_states(roll, module.objective.points("teacher")), None


def student_pass(module: DistillModule, roll: Rollout, teacher_states: dict, saved: SavedBytes | None) -> dict:
    """The rest of the training step's update (`DistillModule.distill` on the given teacher states) and backward,
    the forward under the saved-bytes probe when given."""
    with saved.track() if saved is not None else contextlib.nullcontext():
        terms = module.distiller.distill(roll, teacher=teacher_states)
    tokens = terms.tokens.clamp_min(1)  # response tokens, or those a hidden term alone selects
    (terms.loss / tokens).backward()  # what the optimizer sees after global normalisation
    metrics = terms.metrics()
    return {
        k: float(metrics[name])
        for k, name in (("loss", "loss"), ("hidden", "hidden"), ("token", "token_kl"))
        if name in metrics
    }


def update(module: DistillModule, roll: Rollout, variant: str, device, saved: SavedBytes | None = None) -> dict:
    """Teacher pass, then student forward + loss + backward; returns the two times and the loss terms.

    The full-teacher variant keeps its logits alive until the backward is done, as its source implementation did.
    """
    activate(module)  # the shared student trains what this variant's loss reaches (OPRD: not the final norm)
    teacher_out, teacher_s = timed(lambda: run_teacher(module, roll, variant), device)
    terms, student_s = timed(lambda: student_pass(module, roll, teacher_out[0], saved), device)
    module.zero_grad(set_to_none=True)
    return {"teacher_s": teacher_s, "student_s": student_s, **terms}


def measure_memory(module: DistillModule, roll: Rollout, variant: str, device) -> dict:
    """One update under the memory probes: its peak increase and the student's saved-for-backward bytes."""
    saved = SavedBytes(
        [*module.student.parameters(), *module.objective.parameters(), *module.pair.teacher.parameters()]
    )
    result, peak = peak_bytes(lambda: update(module, roll, variant, device, saved), device)
    terms = {k: result[k] for k in ("loss", "hidden", "token") if k in result}
    return {
        "peak_mib": peak / MIB,
        "saved_mib": saved.total / MIB,
        "probed_teacher_s": result["teacher_s"],
        "probed_student_s": result["student_s"],
        **terms,
    }


# ---- FLOPs ----------------------------------------------------------------------------------------------------


def layer_params(model) -> list[int]:
    """Parameters of each decoder layer."""
    from oprd.models.layers import find_layers

    return [sum(p.numel() for p in layer.parameters()) for layer in find_layers(model)]


def model_flops(module: DistillModule, roll: Rollout, variant: str) -> float:
    """Model FLOPs of one update: 2 * params * tokens (teacher, layers run) + 6 * params * tokens (student).

    LM heads count where they run: over all tokens for full logits, over response tokens for the chunked head.
    """
    tokens = float(roll.attention_mask.numel())
    response = float(roll.response_mask.sum())
    head = module.student.get_output_embeddings().weight.numel()
    token_cfg = module.objective.token_loss
    teacher_layers = layer_params(module.pair.teacher)
    deepest = max((t for _, t in module.objective.pairs if t != "norm"), default=len(teacher_layers) - 1)
    run = len(teacher_layers) if token_cfg is not None or variant == FULL_TEACHER else deepest + 1
    flops = 2 * tokens * sum(teacher_layers[:run]) + 6 * tokens * sum(layer_params(module.student))
    flops += 6 * tokens * sum(p.numel() for p in module.objective.parameters())
    if variant == FULL_TEACHER:
        flops += 2 * tokens * head
    if token_cfg is not None:
        head_tokens = tokens if token_cfg.chunk_size == 0 else response
        flops += (2 + 6) * head_tokens * head
    return flops


# ---- the run ----------------------------------------------------------------------------------------------------


def fixed_length_rollout(module: DistillModule, args, device) -> tuple[Rollout, float]:
    """Sample `batch` responses of exactly `response_tokens` tokens (EOS suppressed until then), timed."""
    prompts = [item["prompt"] for item in arithmetic_examples("train")[: args.batch]]
    config = RolloutConfig(max_new_tokens=args.response_tokens, temperature=1.0)
    module.student.generation_config.min_new_tokens = args.response_tokens
    try:
        return timed(lambda: module.distiller.sample(prompts, config, seed=args.seed), device)
    finally:
        module.student.generation_config.min_new_tokens = None


def engine_rollouts(module: DistillModule, args, device) -> list[dict]:
    """Per rollout engine: the same prompts and seeds, responses up to `response_tokens` (stopping at EOS), timed
    after one warm-up rollout (vLLM's import and start-up are not counted); tokens per second."""
    prompts = [item["prompt"] for item in arithmetic_examples("train")[: args.batch]]
    rows = []
    for name in args.engines:
        module.pair.engine = get_engine(name)
        config = RolloutConfig(max_new_tokens=args.response_tokens, temperature=1.0, engine=name)
        module.distiller.sample(prompts, config, seed=args.seed + 1)  # warm-up
        seeds = [args.seed + 2 + i for i in range(3)]
        samples = [
            timed(lambda c=config, s=seed: module.distiller.sample(prompts, c, seed=s), device) for seed in seeds
        ]
        tokens = sum(int(roll.response_mask.sum()) for roll, _ in samples)
        seconds = sum(s for _, s in samples)
        rows.append(
            {"engine": name, "rollout_tokens": tokens / 3, "rollout_s": seconds / 3, "tokens_per_s": tokens / seconds}
        )
    module.pair.engine = get_engine("hf")
    return rows


def build_variants(args, device) -> dict[str, DistillModule]:
    """One module per variant, all sharing the first one's teacher and student weights."""
    pair = make_pair(args.pair, args.models, args.dtype)
    if args.lora:  # a LoRA student: adapters on every linear layer but the head, the base frozen
        pair = dataclasses.replace(pair, student=dataclasses.replace(pair.student, lora=LoraSettings(r=args.lora)))
    rollout = RolloutConfig(max_new_tokens=args.response_tokens)
    modules: dict[str, DistillModule] = {}
    for variant in args.variants:
        method = "oprd" if variant == FULL_TEACHER else variant
        module = build_module(pair, method, rollout, seed=args.seed)
        if modules:
            share_models(module, next(iter(modules.values())))
        modules[variant] = module.to(device)
        module.pair.frozen_teacher.rest(device)
    reference = next(iter(modules.values()))
    reference.student.train()
    if args.checkpointing:
        enable = getattr(reference.student, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            reference.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return modules


def run(args) -> tuple[list[dict], dict]:
    """Rollout once, then per variant a probed update (memory) and `repeats` timed updates, round-robin."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    modules = build_variants(args, device)
    reference = next(iter(modules.values()))
    roll, rollout_s = fixed_length_rollout(reference, args, device)
    # The matmul peak is sampled between rounds and the best kept: on a shared machine a single sample taken while
    # another job runs would understate the hardware and overstate MFU.
    dtype = DTYPES[args.dtype]  # MFU against the matmul throughput of the models' own dtype
    matmul = [matmul_flops_per_s(device, dtype=dtype)]
    update(reference, roll, args.variants[0], device)  # warm-up: one-time allocations, thread pools, kernels
    rows = {v: {"variant": v, **measure_memory(m, roll, v, device)} for v, m in modules.items()}
    matmul.append(matmul_flops_per_s(device, dtype=dtype))
    times: dict[str, list[dict]] = {v: [] for v in modules}
    for _ in range(args.repeats):
        for variant, module in modules.items():
            times[variant].append(update(module, roll, variant, device))
        matmul.append(matmul_flops_per_s(device, dtype=dtype))
    flops_per_s = max(matmul)
    for variant, row in rows.items():
        samples = times[variant] or [{"teacher_s": row["probed_teacher_s"], "student_s": row["probed_student_s"]}]
        row["rollout_s"] = rollout_s
        row["teacher_s"] = median(s["teacher_s"] for s in samples)
        row["student_s"] = median(s["student_s"] for s in samples)
        row["update_s"] = median(s["teacher_s"] + s["student_s"] for s in samples)
        row["step_s"] = rollout_s + row["update_s"]
        row["model_tflops"] = model_flops(modules[variant], roll, variant) / 1e12
        row["mfu"] = row["model_tflops"] * 1e12 / row["update_s"] / flops_per_s
    engines = engine_rollouts(reference, args, device) if args.engines != ["hf"] else []
    context = {
        "engines": engines,
        "tokens": int(roll.attention_mask.numel()),
        "response_tokens": int(roll.response_mask.sum()),
        "shape": list(roll.input_ids.shape),
        "matmul_gflops": flops_per_s / 1e9,
        "matmul_gflops_samples": [round(f / 1e9, 1) for f in matmul],
        "device": device,
    }
    return list(rows.values()), context


def summarize(rows: list[dict], context: dict) -> dict:
    """OPRD over each OPD variant: memory ratio and speedup, for the update and for the whole step."""
    by = {row["variant"]: row for row in rows}
    summary = {"paper_memory_ratio_vs_opd_top16": PAPER["memory_ratio"], "paper_speedup_vs_opd_top16": PAPER["speedup"]}
    for base in ("opd_top16_dense", "opd_top16", "opd_dense", "opd"):
        if "oprd" in by and base in by:
            summary[f"oprd_over_{base}_memory"] = ratio(by["oprd"]["peak_mib"], by[base]["peak_mib"])
            summary[f"oprd_speedup_vs_{base}_update"] = ratio(by[base]["update_s"], by["oprd"]["update_s"])
            summary[f"oprd_speedup_vs_{base}_step"] = ratio(by[base]["step_s"], by["oprd"]["step_s"])
    if "oprd" in by and FULL_TEACHER in by:
        summary["oprd_over_full_teacher_memory"] = ratio(by["oprd"]["peak_mib"], by[FULL_TEACHER]["peak_mib"])
        summary["oprd_speedup_vs_full_teacher_update"] = ratio(by[FULL_TEACHER]["update_s"], by["oprd"]["update_s"])
    if "oprd" in by:
        summary["oprd_mfu"] = by["oprd"]["mfu"]
        summary["rollout_share_of_oprd_step"] = ratio(by["oprd"]["rollout_s"], by["oprd"]["step_s"])
    engines = {row["engine"]: row for row in context.get("engines", [])}
    if "hf" in engines and "vllm" in engines:
        summary["vllm_over_hf_rollout_tokens_per_s"] = ratio(
            engines["vllm"]["tokens_per_s"], engines["hf"]["tokens_per_s"]
        )
    if "oprd" in by:
        for name, row in engines.items():
            # The update's fixed-length rollout at this engine's throughput, over the whole OPRD step.
            rollout_s = context["response_tokens"] / row["tokens_per_s"]
            summary[f"rollout_share_of_oprd_step_{name}"] = rollout_s / (rollout_s + by["oprd"]["update_s"])
    summary.update({k: v for k, v in context.items() if k != "device"})  # engines: each one's tokens/s
    return summary


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Left: stacked step time (rollout, teacher, student); right: update delta-peak memory, per variant."""
    plt = pyplot()
    names = [r["variant"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(rows)
    for part in ("rollout_s", "teacher_s", "student_s"):
        values = [r[part] for r in rows]
        ax_time.bar(names, values, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_time.set_ylabel("seconds (shared machine: compare ratios only)")
    ax_time.legend(fontsize=8)
    ax_mem.bar(names, [r["peak_mib"] for r in rows], color="tab:purple")
    ax_mem.set_ylabel("update delta peak (MiB)")
    title = f"{summary['shape'][0]} x {summary['shape'][1]} tokens, {summary['response_tokens']} response tokens"
    ax_time.set_title(f"one training step ({title})", fontsize=9)
    ax_mem.set_title("peak memory increase during the update", fontsize=9)
    for ax in (ax_time, ax_mem):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["variant", "rollout_s", "teacher_s", "student_s", "step_s", "peak_mib", "saved_mib", "model_tflops", "mfu"]


def print_report(rows: list[dict], summary: dict) -> None:
    print(markdown_table(rows, COLUMNS))
    print()
    print(markdown_table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"]))
    if "oprd_over_opd_top16_dense_memory" in summary:
        print(
            f"\nOPRD vs OPD top-16 (full logits): memory x{summary['oprd_over_opd_top16_dense_memory']:.2f} "
            f"(paper x{PAPER['memory_ratio']}), update speedup x{summary['oprd_speedup_vs_opd_top16_dense_update']:.2f}"
            f", step speedup x{summary['oprd_speedup_vs_opd_top16_dense_step']:.2f} (paper x{PAPER['speedup']})"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, 8 response tokens, 4 variants: under a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--pair", choices=PAIRS, default="pruned", help="teacher/student pair")
    parser.add_argument("--models", choices=["smollm2", "tiny"], default="smollm2", help="real or tiny random models")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (headline setting: 8)")
    parser.add_argument("--response-tokens", type=int, default=64, help="response length (headline setting: 1024)")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="student activation checkpointing (default on)",
    )
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, "kd"], default=VARIANTS, help="methods to run")
    parser.add_argument("--repeats", type=int, default=1, help="timed updates per variant after the probed one")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="rollout seed")
    parser.add_argument("--lora", type=int, default=0, help="a LoRA student of this rank (0: full fine-tuning)")
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf"],
                        help="rollout engines to time side by side (vllm: run under .venv-vllm)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.response_tokens, args.repeats = 2, 8, 0
        args.variants = [v for v in args.variants if v in QUICK_VARIANTS]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    quiet()
    rows, context = run(args)
    summary = summarize(rows, context)
    print_report(rows, summary)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(args.out, NAME, summary, rows, meta={**metadata(context["device"]), "settings": settings})
    plot(rows, summary, args.out / f"{NAME}.png")
    print(f"\nwrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.png')}")
    return summary


if __name__ == "__main__":
    main()
