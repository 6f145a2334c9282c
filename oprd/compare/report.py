"""What `oprd compare` shows and writes: a table in the terminal, `compare.json` and `compare.png`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from oprd.compare.probe import METRICS


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """One row per objective: its chosen learning rate, test-split metrics, cost; then the final-only sets."""
    # Rich draws 80 columns when the output is not a terminal (a log file, CI): too few for every column.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    summary = result["summary"]
    chosen = summary["objectives"]
    legend = _legend(memory_label(result))
    table = Table(title=_title(summary), caption="\n".join([*_how_set(summary), legend]))
    for column in ["objective", "lr", "steps", *HEADERS.values(), "s/step", "MiB"]:
        table.add_column(column, justify="left" if column == "objective" else "right")
    for objective, entry in chosen.items():
        table.add_row(
            objective,
            _rate(entry["lr"]),
            _number(entry["steps"]),
            *(_number(entry["test"].get(m)) for m in METRICS),
            _number(entry["update_s"]),
            _number(entry["update_mib"]),
        )
    console.print(table)
    for split in dict.fromkeys(split for entry in chosen.values() for split in entry["final_only"]):
        sub = Table(title=f"final weights on {split}")
        for column in ("objective", *HEADERS.values()):
            sub.add_column(column, justify="left" if column == "objective" else "right")
        for objective, entry in chosen.items():
            if split in entry["final_only"]:
                sub.add_row(objective, *(_number(entry["final_only"][split].get(m)) for m in METRICS))
        console.print(sub)


HEADERS = {
    "reverse_kl": "KL",
    "accuracy": "acc",
    "repetition": "rep",
    "distinct_4": "dist4",
    "cos": "cos",
    "response_length": "len",
}


def memory_label(result: dict[str, Any]) -> str:
    """What the memory figures of a comparison are (`oprd.training.memory.KINDS`), as measured by its runs."""
    kinds = sorted({run["memory"] for run in result.get("runs", []) if run.get("memory")})
    return " / ".join(kinds) or "update peak (not measured)"


def _title(summary: dict[str, Any]) -> str:
    hows = {entry.get("how", "chosen") for entry in summary["objectives"].values()}
    if summary["one_shared_learning_rate"]:
        return "oprd compare: held-out test split, every objective at one shared learning rate (not tuned)"
    if hows == {"chosen"}:
        return "oprd compare: held-out test split, each objective at the learning rate chosen on the selection split"
    return "oprd compare: held-out test split, each objective at the learning rate said below"


def _how_set(summary: dict[str, Any]) -> list[str]:
    """How each objective's learning rate was set: chosen on the selection split (and how a tie was broken), given
    (one rate, not tuned) or none to report; and which rates diverged."""
    chosen = summary["objectives"]
    parts = []
    for objective, entry in chosen.items():
        how = entry.get("how", "chosen")
        if how == "chosen":
            tried = ", ".join(_rate(lr) for lr in entry["lrs_tried"])
            part = f"{objective}: lr chosen by {summary['select']} on the selection split of {tried}"
        elif how == "given":
            part = f"{objective}: lr given (one rate, not tuned)"
        else:
            part = f"{objective}: no rate to report"
        notes = [entry.get("note")]  # with no rate to report, it says why: which rates diverged
        if how != "none":
            notes += [f"{_rate(d['lr'])} diverged at step {d['step']}" for d in entry.get("diverged", [])]
        parts.append(part + "".join(f" ({note})" for note in notes if note))
    return parts


def _legend(memory: str) -> str:
    return (
        "KL: teacher-scored reverse KL per token; acc: accuracy; rep: repetition; dist4: distinct-4; cos: cosine to "
        "the teacher; len: response tokens; s/step: update seconds per optimizer step; MiB: "
        f"{memory}, the peak allocated during one step's update above the memory allocated when it began (weights, "
        "optimizer state and rollout not included)."
    )


def _rate(lr: float | None) -> str:
    """A learning rate as it is written on the command line: `1e-4`, `3e-5` (the config's own: `-`)."""
    if lr is None:
        return "-"
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def plot(result: dict[str, Any], path: Path) -> Path:
    """Held-out KL and accuracy vs step and vs training seconds, per run; update peak memory per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["split"] == "test"]
    runs = sorted({(r["objective"], r["lr"]) for r in rows}, key=str)
    panels = [("step", "reverse_kl"), ("train_s", "reverse_kl"), ("step", "accuracy"), ("train_s", "accuracy"),
              ("step", "repetition")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.8))
    chosen = result["summary"]["objectives"]
    colors = {objective: f"C{i}" for i, objective in enumerate(chosen)}
    for ax, (x, y) in zip(axes, panels, strict=False):
        for objective, lr in runs:
            curve = [r for r in rows if r["objective"] == objective and r["lr"] == lr and r.get(y) is not None]
            how = chosen[objective].get("how")
            best = chosen[objective]["lr"] == lr and how != "none"
            label = f"{objective} lr={_number(lr)}" + (f" ({how})" if best else "")
            ax.plot([r[x] for r in curve], [r[y] for r in curve], marker="o", markersize=3, label=label,
                    color=colors[objective], linewidth=2 if best else 0.8, alpha=1 if best else 0.4,
                    linestyle="-" if best else "--")  # fmt: skip
        ax.set_xlabel("training seconds (ratios only)" if x == "train_s" else "optimizer step")
        ax.set_title(f"test split: {y}", fontsize=9)
        ax.grid(True, alpha=0.3)
        if y == "reverse_kl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    names = list(chosen)
    axes[-1].bar(names, [chosen[n]["update_mib"] or 0 for n in names], color="tab:purple")
    axes[-1].set_title(f"MiB: {memory_label(result)}", fontsize=9)
    axes[-1].tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
