"""Loss-level memory and time: forward + backward of one distillation loss on synthetic hidden states.

Shape legend:
    n  tokens (B*T, all kept)
    d  hidden width (student and teacher alike)
    v  vocabulary
    l  mapped layers of the hidden loss

Rows: OPRD's hidden MSE over all `l` layers (through `oprd.align.Projectors`), and the token-space losses of OPD
computed from final hidden states by `oprd.lm_head`: reverse KL (dense `[n, v]` logits vs chunked), top-16 with the
stop-gradient estimator (dense and chunked) and JSD(0.5) (dense vs chunked). Each row reports the peak memory of
its forward + backward over what existed before (see `common`), the bytes saved for backward, and the median time.
Rows whose estimated memory or time exceeds the limits are skipped with a note instead of crashing the machine.

    .venv/bin/python -m benchmarks.loss_memory [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import (
    DEFAULT_OUT,
    GIB,
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
    ratio,
    timed,
    write_json,
)
from oprd.losses.hidden import HiddenLossConfig, hidden_loss_sums
from oprd.losses.lm_head import chunked_token_loss_sum, dense_token_loss_sum
from oprd.losses.token import TokenLossConfig
from oprd.objective.projectors import Projectors, pair_label
from oprd.training.throughput import SavedBytes

NAME = "loss_memory"
GRIDS = {
    # The grid: Qwen-, SmolLM2- and Llama-sized vocabularies, SmolLM2 (576) and Qwen2.5-1.5B (1536) widths.
    "full": {"vocab": [32768, 49152, 151936], "tokens": [1024, 4096, 16384], "width": [576, 1536], "layers": [15, 28]},
    # What a shared 2-core CPU gets through in minutes: the grid's smallest token count and two below it.
    "cpu": {"vocab": [32768, 49152], "tokens": [256, 512, 1024], "width": [576], "layers": [15, 28]},
    "quick": {"vocab": [8192], "tokens": [128, 256], "width": [576], "layers": [15]},
}
# LM-head chunk per grid: oprd's default (1024) where the token counts reach it, smaller where they do not, so the
# chunked rows still split the tokens into several chunks (their memory grows with the chunk, not with the tokens).
CHUNK_SIZES = {"full": 1024, "cpu": 256, "quick": 64}
HIDDEN = "oprd_hidden_mse"
TOKEN_LOSSES: dict[str, dict] = {
    "opd_rkl_dense": {"objective": "reverse_kl", "estimator": "exact", "chunked": False},
    "opd_rkl_chunked": {"objective": "reverse_kl", "estimator": "exact", "chunked": True},
    "opd_top16_dense": {"objective": "reverse_kl", "estimator": "topk_sg", "chunked": False},
    "opd_top16_chunked": {"objective": "reverse_kl", "estimator": "topk_sg", "chunked": True},
    "jsd_dense": {"objective": "jsd", "estimator": "exact", "chunked": False},
    "jsd_chunked": {"objective": "jsd", "estimator": "exact", "chunked": True},
}
LOSSES = (HIDDEN, *TOKEN_LOSSES)
# (numerator, denominator) pairs reported in the summary at the reference case.
HEADLINE = [
    (HIDDEN, "opd_rkl_dense"),
    (HIDDEN, "opd_rkl_chunked"),
    (HIDDEN, "opd_top16_dense"),
    ("opd_rkl_chunked", "opd_rkl_dense"),
    ("opd_top16_chunked", "opd_top16_dense"),
    ("jsd_chunked", "jsd_dense"),
]


@dataclass(frozen=True)
class Case:
    """One row of the grid."""

    loss: str
    """A name from LOSSES."""
    tokens: int
    """n: kept tokens (B*T)."""
    width: int
    """d: hidden width."""
    vocab: int | None = None
    """v: vocabulary (token losses only)."""
    layers: int | None = None
    """l: mapped layers (hidden loss only)."""


def grid_cases(grid: dict[str, list[int]], losses: list[str]) -> list[Case]:
    """Every row: the hidden loss over (n, d, l), the token losses over (n, d, v), grouped by (n, d, v or l)."""
    cases = []
    for tokens, width in itertools.product(grid["tokens"], grid["width"]):
        if HIDDEN in losses:
            cases += [Case(HIDDEN, tokens, width, layers=layers) for layers in grid["layers"]]
        for vocab in grid["vocab"]:
            cases += [Case(loss, tokens, width, vocab=vocab) for loss in losses if loss != HIDDEN]
    return cases


# ---- estimates (to skip rows that cannot fit) -----------------------------------------------------------------


def estimate(case: Case, chunk_size: int) -> tuple[float, float]:
    """Rough `(bytes, FLOPs)` of one forward + backward, to skip rows before they exhaust memory or patience."""
    n, d = case.tokens, case.width
    if case.loss == HIDDEN:
        # Inputs (states, targets) plus ~2 live [l, n, d] buffers measured at the peak; three matmuls per projection.
        return 4 * case.layers * n * d * 4, case.layers * (6 * n * d * d + 10 * n * d)
    v = case.vocab
    rows = min(n, chunk_size) if TOKEN_LOSSES[case.loss]["chunked"] else n
    # ~8 live [rows, v] fp32 buffers (both models' logits, log-probs, probabilities, gradients) plus the head grad.
    memory = 8 * rows * v * 4 + 2 * v * d * 4
    # Teacher + student head forward and the two backward matmuls; checkpointing re-runs both heads.
    matmuls = 12 if TOKEN_LOSSES[case.loss]["chunked"] else 8
    return memory, matmuls * n * d * v + 30 * n * v


# ---- the losses -----------------------------------------------------------------------------------------------


def hidden_inputs(case: Case, device: torch.device) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """OPRD: `l` student states `[1, n, d]` through identity-initialised projectors, MSE against `l` teacher states."""
    pairs = [(i, i) for i in range(case.layers)]
    projectors = Projectors(pairs, case.width, case.width).to(device)
    student = {i: torch.randn(1, case.tokens, case.width, device=device, requires_grad=True) for i, _ in pairs}
    teacher = {pair_label(p): torch.randn(1, case.tokens, case.width, device=device) for p in pairs}
    mask = torch.ones(1, case.tokens, dtype=torch.bool, device=device)
    config = HiddenLossConfig()

    def loss() -> Tensor:
        sums = hidden_loss_sums(projectors(student), teacher, mask, config)
        return torch.stack(list(sums.values())).mean() / case.tokens

    return loss, [*student.values(), *teacher.values(), *projectors.parameters()]


def token_inputs(case: Case, device: torch.device, chunk_size: int) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """OPD: student/teacher final states `[1, n, d]` and `Linear(d, v)` heads, loss straight from hidden states."""
    spec = TOKEN_LOSSES[case.loss]
    chunk = chunk_size if spec["chunked"] else 0
    config = TokenLossConfig(objective=spec["objective"], estimator=spec["estimator"], top_k=16, chunk_size=chunk)
    fn = chunked_token_loss_sum if spec["chunked"] else dense_token_loss_sum
    student_head = nn.Linear(case.width, case.vocab, bias=False).to(device)
    teacher_head = torch.randn(case.vocab, case.width, device=device) / math.sqrt(case.width)
    student = torch.randn(1, case.tokens, case.width, device=device, requires_grad=True)
    teacher = torch.randn(1, case.tokens, case.width, device=device)
    mask = torch.ones(1, case.tokens, dtype=torch.bool, device=device)

    def loss() -> Tensor:
        return fn(student, student_head, teacher, teacher_head, None, mask, config, case.vocab) / case.tokens

    return loss, [student, teacher, teacher_head, student_head.weight]


# ---- measuring one row ----------------------------------------------------------------------------------------


def clear_grads(tensors: list[Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def measure(case: Case, device: torch.device, repeats: int, chunk_size: int) -> dict:
    """Peak memory and saved bytes from one pass, then the median time of `repeats` more passes."""
    # Seeded by shape, so a dense row and its chunked twin see the same inputs (their loss values must agree).
    torch.manual_seed(case.tokens * 7919 + case.width * 31 + (case.vocab or case.layers))
    if case.loss == HIDDEN:
        loss_fn, tensors = hidden_inputs(case, device)
    else:
        loss_fn, tensors = token_inputs(case, device, chunk_size)
    saved = SavedBytes(tensors)

    def first_pass() -> float:
        with saved.track():
            loss = loss_fn()
        loss.backward()
        return loss.item()

    value, peak = peak_bytes(first_pass, device)
    clear_grads(tensors)
    seconds = []
    for _ in range(repeats):
        _, elapsed = timed(lambda: loss_fn().backward(), device)
        seconds.append(elapsed)
        clear_grads(tensors)
    return {"loss_value": value, "peak_mib": peak / MIB, "saved_mib": saved.total / MIB, "time_s": median(seconds)}


def run_case(case: Case, device: torch.device, args, flops_per_s: float) -> dict:
    """Measure one row, or skip it with a note when its estimated memory or time is over the limits."""
    memory, flops = estimate(case, args.chunk_size)
    row = {**asdict(case), "est_gib": memory / GIB, "est_s": flops / flops_per_s, "note": ""}
    if memory > args.max_gib * GIB:
        return {**row, "note": f"skipped: needs ~{memory / GIB:.1f} GiB > --max-gib {args.max_gib}"}
    if row["est_s"] > args.max_row_seconds:
        return {**row, "note": f"skipped: ~{row['est_s']:.0f} s per pass > --max-row-seconds {args.max_row_seconds}"}
    try:
        return {**row, **measure(case, device, args.repeats, args.chunk_size)}
    except torch.OutOfMemoryError:
        return {**row, "note": "skipped: out of memory"}


# ---- summary, table, plot -------------------------------------------------------------------------------------


def find(rows: list[dict], loss: str, tokens: int, width: int, vocab: int, layers: int) -> dict | None:
    for row in rows:
        shape_ok = row["vocab"] == vocab if row["loss"] != HIDDEN else row["layers"] == layers
        if row["loss"] == loss and row["tokens"] == tokens and row["width"] == width and shape_ok and "peak_mib" in row:
            return row
    return None


def reference_case(rows: list[dict], grid: dict[str, list[int]], losses: set[str]) -> dict[str, int] | None:
    """SmolLM2-like shapes (d 576, v 49152, 15 layers) when in the grid, at the most tokens all `losses` ran at."""

    def closest(options: list[int], target: int) -> int:
        return min(options, key=lambda o: abs(o - target))

    width, vocab, layers = closest(grid["width"], 576), closest(grid["vocab"], 49152), closest(grid["layers"], 15)
    for tokens in sorted(grid["tokens"], reverse=True):
        if all(find(rows, loss, tokens, width, vocab, layers) for loss in losses):
            return {"tokens": tokens, "width": width, "vocab": vocab, "layers": layers}
    return None


def summarize(rows: list[dict], grid: dict[str, list[int]], losses: list[str]) -> dict:
    """Headline ratios (memory and time, numerator over denominator) at the reference case."""
    pairs = [(num, den) for num, den in HEADLINE if num in losses and den in losses]
    ref = reference_case(rows, grid, {name for pair in pairs for name in pair})
    summary: dict = {"reference": ref}
    if ref is None:
        return summary
    for num, den in pairs:
        a, b = find(rows, num, **ref), find(rows, den, **ref)
        summary[f"{num}_over_{den}_memory"] = ratio(a["peak_mib"], b["peak_mib"])
        summary[f"{num}_over_{den}_time"] = ratio(a["time_s"], b["time_s"])
    summary["chunked_vs_dense_max_rel_diff"] = max_rel_diff(rows)
    return summary


def max_rel_diff(rows: list[dict]) -> float | None:
    """Largest relative gap between a dense row's loss value and its chunked twin's (they must agree)."""
    gaps = []
    for row in rows:
        if row["loss"].endswith("_dense") and "loss_value" in row:
            twin = find(rows, row["loss"].replace("_dense", "_chunked"), row["tokens"], row["width"], row["vocab"], 0)
            if twin:
                gaps.append(abs(twin["loss_value"] - row["loss_value"]) / max(abs(row["loss_value"]), 1e-12))
    return max(gaps) if gaps else None


def plot(rows: list[dict], ref: dict[str, int] | None, path: Path) -> None:
    """Peak memory and time vs tokens, one line per loss, at the reference width / vocabulary / layers."""
    plt = pyplot()
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    if ref is not None:
        for loss in LOSSES:
            points = [
                (r["tokens"], r["peak_mib"], r["time_s"])
                for r in rows
                if r["loss"] == loss
                and r["width"] == ref["width"]
                and "peak_mib" in r
                and (r["vocab"] == ref["vocab"] if loss != HIDDEN else r["layers"] == ref["layers"])
            ]
            if points:
                tokens, mem, sec = zip(*sorted(points), strict=True)
                style = "--" if loss.endswith("_chunked") else "-"
                ax_mem.plot(tokens, mem, style, marker="o", label=loss)
                ax_time.plot(tokens, sec, style, marker="o", label=loss)
        title = f"d={ref['width']}, V={ref['vocab']}, hidden over {ref['layers']} layers"
        ax_mem.set_title(f"peak memory of fwd+bwd ({title})", fontsize=9)
        ax_time.set_title("median fwd+bwd time (shared machine: compare ratios only)", fontsize=9)
    for ax, label in ((ax_mem, "MiB"), (ax_time, "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (B*T)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["loss", "tokens", "width", "vocab", "layers", "peak_mib", "saved_mib", "time_s", "loss_value", "note"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid: under a minute on a 2-core CPU")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="full (default on CUDA), cpu (default on CPU), quick")
    parser.add_argument("--tokens", type=int, nargs="+", help="override the grid's token counts")
    parser.add_argument("--vocab", type=int, nargs="+", help="override the grid's vocabularies")
    parser.add_argument("--width", type=int, nargs="+", help="override the grid's widths")
    parser.add_argument("--layers", type=int, nargs="+", help="override the grid's layer counts")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="rows to run")
    parser.add_argument("--chunk-size", type=int, help="LM-head chunk (default 1024 full, 256 cpu, 64 quick)")
    parser.add_argument("--repeats", type=int, help="timed passes per row, median (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--max-gib", type=float, default=8.0, help="skip rows estimated to need more memory")
    parser.add_argument("--max-row-seconds", type=float, default=20.0, help="skip rows estimated to take longer")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.repeats = "quick", 1 if args.repeats is None else args.repeats
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    device = pick_device(args.device)
    if args.repeats is None:
        args.repeats = 3 if device.type == "cuda" else 1
    name = args.grid or ("full" if device.type == "cuda" else "cpu")
    grid = {key: getattr(args, key) or values for key, values in GRIDS[name].items()}
    args.chunk_size = args.chunk_size or CHUNK_SIZES[name]
    torch.manual_seed(0)
    flops_per_s = matmul_flops_per_s(device)
    rows = []
    for case in grid_cases(grid, args.losses):
        rows.append(run_case(case, device, args, flops_per_s))
        row = rows[-1]
        shown = f"{row.get('peak_mib', float('nan')):.1f} MiB, {row.get('time_s', float('nan')):.3f} s"
        print(f"{case.loss:>18} n={case.tokens} d={case.width} v={case.vocab} l={case.layers}: {row['note'] or shown}")
    summary = summarize(rows, grid, args.losses)
    summary["matmul_gflops"] = flops_per_s / 1e9
    print()
    print(markdown_table(rows, COLUMNS))
    print()
    print(markdown_table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"]))
    meta = {**metadata(device), "grid": grid, "grid_name": name, "chunk_size": args.chunk_size, "repeats": args.repeats}
    write_json(args.out, NAME, summary, rows, meta=meta)
    plot(rows, summary["reference"], args.out / f"{NAME}.png")
    print(f"\nwrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.png')}")
    return summary


if __name__ == "__main__":
    main()
