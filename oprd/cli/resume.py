"""What a run from a checkpoint, or a run that writes them, is checked for before any model loads.

`--ckpt_path last` is resolved here to the file it names, so it gets every check a path gets (a readable checkpoint,
the settings it fixes, the data position); `best` is refused, since only the `fit` that saved a best checkpoint
knows which one it is. Settings that would make a run save nothing, or train nothing, are named.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from oprd.data import check_position

log = logging.getLogger(__name__)

LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")
"""The names Lightning gives `last` checkpoints (`last.ckpt`, `last-v1.ckpt`, ...)."""


def checkpoint_dir(config) -> str:
    """Where the run's checkpoints go: `checkpoint.dirpath`, by default `<trainer.default_root_dir>/checkpoints`."""
    root = config.trainer.default_root_dir or os.getcwd()
    return config.checkpoint.dirpath or os.path.join(root, "checkpoints")


def resolve_ckpt_path(subcommand: str, config) -> str | None:
    """The checkpoint file a run starts from: `--ckpt_path` as given, or for `last` the newest `last*.ckpt` in the
    checkpoint folder (Lightning's choice, made here before any model loads so that it is checked like a path).

    With no earlier checkpoint, `fit --ckpt_path last` starts from step 0 with a warning, as Lightning's does: a job
    script (a preemptible or time-limited cluster job) runs the same command every time, the first time included.

    Raises:
        ValueError: `best`, or `last` with nothing to evaluate, naming the fix.
    """
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "best":
        raise ValueError(
            f"--ckpt_path best: only the `oprd fit` that saved a best checkpoint knows which one it is. Give the file: "
            f"--ckpt_path {checkpoint_dir(config)}/last.ckpt, or one that --checkpoint.save_top_k with "
            "--checkpoint.monitor kept there."
        )
    if ckpt_path != "last" or "://" in checkpoint_dir(config):
        return ckpt_path  # a remote folder is left to Lightning
    folder = Path(checkpoint_dir(config))
    found = [path for path in folder.iterdir() if LAST.match(path.name) and path.is_file()] if folder.is_dir() else []
    if found:
        return str(max(found, key=lambda path: path.stat().st_mtime))
    if subcommand == "fit":
        log.warning("--ckpt_path last: no last.ckpt in %s yet, so this run starts from step 0.", folder)
        return None
    raise ValueError(
        f"--ckpt_path last: there is no last.ckpt in {folder} to {subcommand}. Train one with `oprd fit` and the same "
        "--trainer.default_root_dir (or --checkpoint.dirpath), or give a checkpoint file."
    )


def check_resumed_data(checkpoint: dict[str, Any], data: dict[str, Any], ckpt_path: str) -> None:
    """A `fit` from a checkpoint keeps the data order the checkpoint's position is in: the same `data.seed` and, mid
    epoch, the same `data.batch_size` (the process count is checked when the loader restores).

    Raises:
        ValueError: naming the saved and the given value and the fix.
    """
    flag = f"--ckpt_path {ckpt_path}"
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if "seed" in saved and saved["seed"] != data["seed"]:
        raise ValueError(
            f"{flag} was trained with data.seed = {saved['seed']}, but this run sets {data['seed']}: the seed orders "
            "every epoch (and splits a built-in task into training and held-out prompts), so the resumed run would "
            f"skip some prompts and repeat others. Resume with --data.seed {saved['seed']}."
        )
    loader = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    for state in loader:
        check_position(state, data["batch_size"], None, flag)


def check_fit_settings(config) -> None:
    """`fit` settings that would silently train nothing or save nothing.

    Raises:
        ValueError: `trainer.max_steps 0`.
    """
    if config.trainer.max_steps == 0:
        raise ValueError(
            "--trainer.max_steps 0 trains no step and saves nothing. Give the number of optimizer steps to train "
            "(to extend a run, its total including the steps already done), or -1 for no step limit."
        )
    saves = config.checkpoint.save_last or config.checkpoint.save_top_k != 0
    if not saves:
        log.warning(
            "--checkpoint.save_last false with --checkpoint.save_top_k 0: this run saves no checkpoint (SIGTERM or "
            "Ctrl-C still write last.ckpt). Set --checkpoint.save_last true to keep the newest step."
        )
