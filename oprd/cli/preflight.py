"""Checks that run before any model loads: a bad setting fails in a second, naming the flag and the fix.

Loading a real teacher takes minutes; a negative learning rate, a batch size of 0, a checkpoint path with a typo or an
output folder that cannot be written should not wait for it. Everything here reads the parsed config only.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from oprd.data import NO_HELDOUT, PromptDataModule, check_sources, heldout_source
from oprd.hparams import from_plain, to_plain, typed_model_args
from oprd.models.spec import ModelSpec
from oprd.module import DistillModule
from oprd.rollout.engine import check_strategy
from oprd.training.checkpoint import load_checkpoint

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""`--ckpt_path` values Lightning resolves itself (`last`: the newest `last*.ckpt` in the checkpoint folder)."""
FIXED_BY_CHECKPOINT = ("teacher", "student", "tokenizer", "layer_map", "projector", "bridge")
"""Model settings a checkpoint fixes (its weights only fit them); every other model setting is the run's own."""


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A checkpoint file given by path exists and is one `oprd fit` wrote (checked before Lightning reads it)."""
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry:"):
        return
    load_checkpoint(ckpt_path)


def taken_from_checkpoint(given: dict[str, Any], saved: dict[str, Any], ckpt_path: str) -> list[str]:
    """Which model settings a run started from a checkpoint takes from it: of the models, tokenizer and layer map
    (what its weights fit), those the run leaves at their defaults. Every other setting (learning rate, rollout,
    evaluation, loss weights) is the run's own: LightningCLI writes a checkpoint's saved hyper-parameters over every
    `--model.*` flag, and the caller undoes that.

    Args:
        given: the model settings from the command line and config files.
        saved: the model settings stored in the checkpoint.

    Raises:
        ValueError: a fixed setting the run sets explicitly to another value than the checkpoint's, naming both.
    """
    defaults = inspect.signature(DistillModule.__init__).parameters
    taken = []
    for key in FIXED_BY_CHECKPOINT:
        if key not in saved or _canonical(key, given.get(key)) == _canonical(key, saved[key]):
            continue
        default = defaults[key].default
        if default is not inspect.Parameter.empty and _canonical(key, given.get(key)) == _canonical(key, default):
            taken.append(key)  # not set by this run: the checkpoint's own
            continue
        raise ValueError(
            f"--ckpt_path {ckpt_path} was trained with model.{key} = {_show(saved[key])}, but this run sets "
            f"{_show(given.get(key))}. A checkpoint fixes the models, the tokenizer, the layer map and the projectors "
            f"(its weights fit only those): drop --model.{key} (or that line of the config), or use a checkpoint "
            "trained with it."
        )
    return taken


def _canonical(key: str, value: Any) -> str:
    if key in ("teacher", "student") and value is not None:
        value = to_plain(from_plain(ModelSpec, value))
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else repr(value)


def check_config(subcommand: str, config) -> None:
    """Every check that needs no model: model and data settings, held-out prompts, prompt files, device, output folder.

    Args:
        subcommand: `fit`, `validate`, `test` or `predict`.
        config: the subcommand's parsed config (a jsonargparse Namespace).
    """
    model = config.model.as_dict()
    rollout = typed_model_args(model).get("rollout")
    check_strategy(rollout.engine if rollout is not None else "hf", config.trainer.strategy)
    data = config.data.as_dict()
    PromptDataModule(**data)
    if subcommand != "fit" and heldout_source(data["train"], data["val"]) is None:
        raise ValueError(NO_HELDOUT.format(stage=subcommand))
    train = data["train"] if subcommand == "fit" else None
    check_sources(train, data["val"], seed=data["seed"], num_val=data["num_val"])
    accelerator = config.trainer.accelerator
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--trainer.accelerator {accelerator}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is "
            "False). Use --trainer.accelerator cpu, or auto to take a GPU when there is one."
        )
    check_writable(config.trainer.default_root_dir or os.getcwd(), "--trainer.default_root_dir")


def check_writable(folder: str | Path, flag: str) -> None:
    """The run can create files in `folder` (created if missing): logs, checkpoints and exports go there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".oprd-write-check-"):
            pass
    except OSError as err:
        raise ValueError(
            f"{flag} {folder} cannot be written ({err.strerror}): checkpoints and logs go there. Choose a folder you "
            f"can write, e.g. {flag} runs/my-run."
        ) from err


def keep_earlier_run(checkpoint_dir: str | Path) -> Path | None:
    """Before a fresh `fit` (no `--ckpt_path`), move an earlier run's `last.ckpt` in the same folder aside.

    Otherwise Lightning writes this run's as `last-v1.ckpt` and leaves `last.ckpt` at the old run, so anyone
    validating `last.ckpt` scores the wrong run. The earlier one is renamed (never deleted) after its time of writing.

    Returns:
        where the earlier `last.ckpt` now is, or None when there was none.
    """
    last = Path(checkpoint_dir) / "last.ckpt"
    if not last.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(last.stat().st_mtime))
    kept = last.with_name(f"earlier-run-{stamp}.ckpt")
    for n in range(1, 1000):
        if not kept.exists():
            break
        kept = last.with_name(f"earlier-run-{stamp}-{n}.ckpt")
    shutil.move(last, kept)
    return kept
