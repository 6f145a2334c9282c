"""What `oprd compare` checks before its first run and before it writes to `--out`.

A comparison runs for hours: a mistyped config, objective or prompt source must fail in seconds, not after the first
runs, and never after the results of an earlier comparison in the same folder were overwritten.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from oprd.data import heldout_source, load_prompts
from oprd.training.checkpoint import free_name

log = logging.getLogger(__name__)

NO_ANSWERS = (
    "--select accuracy needs answers, and none of the {total} selection prompts (every other held-out prompt of "
    '{source}) has one: add "answer" to them, or choose by --select reverse_kl.'
)


def heldout_items(data: dict[str, Any], eval_prompts: int) -> list[dict[str, Any]]:
    """The held-out prompts a comparison scores, refusing fewer than two.

    Args:
        data: the run's `data` settings (`PromptDataModule`'s arguments). `data.max_val_prompts` caps the trainer's
            own validation, which a comparison does not run: it does not cap these.
        eval_prompts: at most this many (`--eval_prompts`).
    """
    source = heldout_source(data["train"], data["val"])
    loaded = [] if source is None else load_prompts(source, "val", seed=data["seed"], num_val=data["num_val"])
    items = loaded[:eval_prompts]
    if len(items) < 2:
        raise ValueError(too_few_heldout(data, len(loaded)))
    return items


def too_few_heldout(data: dict[str, Any], count: int) -> str:
    """Why a comparison has fewer than two held-out prompts (`count` were loaded), and what to change."""
    if heldout_source(data["train"], data["val"]) is None:
        why = 'there are none: add `-- --data.val prompts.jsonl` (one {"prompt": ..., "answer": ...} per line)'
    elif data["val"] is None:  # the held-out split of a built-in task
        why = f"data.num_val is {data['num_val']}: raise it"
    else:
        why = f"data.val {data['val']} holds {count}: add prompts to it"
    return (
        "oprd compare needs at least 2 held-out prompts (half choose each objective's learning rate, half report it), "
        f"and {why}."
    )


def check_answers(selection: list[dict[str, Any]], select: str, source: str) -> None:
    """`--select accuracy` is refused when no selection prompt has an answer: no run would score an accuracy, and the
    choice would fall to the first rate listed. (Accuracy is a mean over the answered prompts.)"""
    if select == "accuracy" and all(item.get("answer") is None for item in selection):
        raise ValueError(NO_ANSWERS.format(total=len(selection), source=source))


def check_final_heldout(sources: list[str], data: dict[str, Any]) -> None:
    """Every `--final_heldout` source loads (a typo there would otherwise fail after the first run trained)."""
    for source in sources:
        try:
            load_prompts(source, "val", seed=data["seed"], num_val=data["num_val"])
        except ValueError as err:
            raise ValueError(f"--final_heldout {source}: {err}") from err


def keep_earlier_progress(path: Path) -> Path | None:
    """Move an earlier comparison's `runs.jsonl` aside (renamed after its time of writing, never deleted), so that a
    new comparison in the same `--out` does not truncate it.

    Returns:
        where the earlier file now is, or None when there was none (or it was empty).
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    kept = free_name(path, f"{path.stem}-earlier", path.suffix)
    shutil.move(path, kept)
    log.warning("compare: an earlier comparison's %s is kept as %s.", path.name, kept.name)
    return kept
