"""Shared measurement helpers of the benchmark scripts: memory, time, throughput, tables and result files.

Memory on CUDA is `max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated before. A CPU has
no such counter (and `tracemalloc` cannot see torch tensors), so on CPU two deterministic figures stand in for it:

* `peak_bytes` (from `oprd.training.memory`): the peak of live bytes allocated inside the measured region, replayed
  from the allocation events of `torch.profiler` (`profile_memory=True`): the CPU analogue of `max_memory_allocated`
  minus the start.
* `saved_bytes`: bytes of the unique storages saved for backward during the forward
  (`torch.autograd.graph.saved_tensors_hooks`), leaving out storages that already existed (inputs, parameters).

Timings are medians and only ever compared as ratios measured side by side in one run (the CPUs these run on
are shared and noisy).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

# The measurements live in oprd (`oprd compare` uses them too); the scripts import them from here.
from oprd.training.memory import cpu_peak_bytes, cuda_peak_bytes, peak_bytes  # noqa: F401

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
GIB = 1024**3
MIB = 1024**2


# ---- devices and timing ---------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A human-readable device name for the results (the GPU model, or the CPU with its core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def add_threads_argument(parser) -> None:
    """`--threads N`: CPU threads for torch (0 keeps torch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default). On a CPU shared with other jobs, 1 avoids threads spinning "
        "while they wait for each other: measured 4x faster here on a loaded 2-core machine",
    )


def apply_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn()` once; return its result and the wall-clock seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def matmul_flops_per_s(device: torch.device, size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured dense matmul throughput (FLOP/s) of `size x size` fp32 products: the MFU denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernels
    _, seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds


# ---- results ------------------------------------------------------------------------------------------------------


def metadata(device: torch.device, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how the figures were produced."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
        "device": describe_device(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_json(out_dir: Path, name: str, summary: dict[str, Any], rows: list[dict[str, Any]], **extra) -> Path:
    """Write `out_dir/<name>.json` holding `summary` (headline ratios), `rows` and any extra sections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"summary": summary, "rows": rows, **extra}, indent=2, default=str) + "\n")
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` (missing cells stay empty; floats get 4 significant digits)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quiet() -> None:
    """Silence the progress bars and info logs of transformers and lightning, and keep hubs offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "oprd"):
        logging.getLogger(name).setLevel(logging.WARNING)
