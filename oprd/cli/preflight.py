"""Checks that run before any model loads: a bad setting fails in a second, naming the flag and the fix.

Loading a real teacher takes minutes; a negative learning rate, a batch size of 0, a checkpoint path with a typo or an
output folder that cannot be written should not wait for it. Everything here reads the parsed config only.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from oprd.data import NO_HELDOUT, PromptDataModule, format_prompts, heldout_source, load_prompts
from oprd.demo.arith import ARITH_SEED, tuning_examples
from oprd.demo.builtin import ARITH_TEACHER
from oprd.distiller import DEFAULT_TEACHER
from oprd.hparams import MOVED, from_plain, moved_message, to_plain, typed_model_args
from oprd.models.spec import ModelSpec
from oprd.models.tokenizers import pair_tokenizer
from oprd.module import DistillModule
from oprd.rollout.engine import check_strategy
from oprd.rollout.vllm import NO_VLLM
from oprd.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""`--ckpt_path` values Lightning resolves itself (`last`: the newest `last*.ckpt` in the checkpoint folder)."""
FIXED_BY_CHECKPOINT = (
    "teacher",
    "student",
    "tokenizer",
    "objective.layer_map",
    "objective.projector",
    "objective.bridge",
    "teachers",
)
"""Model settings a checkpoint fixes (its weights only fit them); every other model setting is the run's own."""
STATEFUL_SETTINGS = {
    ("objective.hidden_loss.kind", "standardized_mse"): "the teacher's running moments",
    ("objective.hidden_loss.layer_weights", "learned"): "the learned layer weights",
}
"""Settings whose state is saved in a checkpoint: a run from it must keep them (or the state would not load)."""


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A checkpoint file given by path exists and is one `oprd fit` wrote (checked before Lightning reads it)."""
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry:"):
        return
    if os.path.isdir(ckpt_path):
        found = sorted(path.name for path in Path(ckpt_path).glob("*.ckpt"))
        inside = f"it holds {', '.join(found[:3])}" if found else "it holds no .ckpt file"
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a folder ({inside}): give one checkpoint file, e.g. --ckpt_path "
            f"{Path(ckpt_path) / (found[0] if found else 'last.ckpt')}, or --ckpt_path last for the newest one in "
            "--checkpoint.dirpath."
        )
    moved = [key for key in load_checkpoint(ckpt_path)["hyper_parameters"] if key in MOVED]
    if moved:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was written by an earlier oprd, whose model settings were not grouped "
            f"({moved_message(moved[0])}). Resume or evaluate it with the version that wrote it; `oprd export` "
            "still reads its student."
        )


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
    check_stateful_settings(given, saved, ckpt_path)
    taken = []
    for key in FIXED_BY_CHECKPOINT:
        was, now = _get(saved, key), _get(given, key)
        now = _default(key) if now is MISSING else now
        if was is MISSING or _canonical(key, now) == _canonical(key, was):
            continue
        if _chosen_by_the_checkpoint(now, was):
            taken.append(key)  # its layers were chosen by importance when the checkpoint's run started
            continue
        if _canonical(key, now) == _canonical(key, _default(key)):
            taken.append(key)  # not set by this run: the checkpoint's own
            continue
        raise ValueError(
            f"--ckpt_path {ckpt_path} was trained with model.{key} = {_show(was)}, but this run sets {_show(now)}. A "
            "checkpoint fixes the models, the tokenizer, the layer map and the projectors (its weights fit only "
            f"those): drop --model.{key} (or that line of the config), or use a checkpoint trained with it."
        )
    return taken


MISSING = object()
"""What `_get` returns for a setting a checkpoint does not hold (a setting it holds may be None)."""


def _get(settings: dict[str, Any] | None, key: str) -> Any:
    """`settings["objective"]["layer_map"]` for `objective.layer_map`; `MISSING` where a level is missing."""
    for part in key.split("."):
        settings = to_plain(settings)
        if not isinstance(settings, dict) or part not in settings:
            return MISSING
        settings = settings[part]
    return to_plain(settings)


def _default(key: str) -> Any:
    """The `DistillModule` default of a (dotted) model setting."""
    head, _, rest = key.partition(".")
    default = inspect.signature(DistillModule.__init__).parameters[head].default
    return None if default is inspect.Parameter.empty else _get({head: default}, key)


def _chosen_by_the_checkpoint(given: Any, saved: Any) -> bool:
    """A model spec that asks for layers chosen by importance (`depth`, no `keep_layers`), and the checkpoint's spec,
    which is the same with the layers it chose: the run continues with those, it does not rank them again."""
    if not (isinstance(given, dict) and isinstance(saved, dict)):
        return False
    if given.get("depth") is None or given.get("keep_layers") is not None or saved.get("keep_layers") is None:
        return False
    if json.dumps(given["depth"], sort_keys=True, default=str) != json.dumps(saved.get("depth"), sort_keys=True):
        return False
    return _canonical("student", {**given, "keep_layers": saved["keep_layers"]}) == _canonical("student", saved)


def check_stateful_settings(given: dict[str, Any], saved: dict[str, Any], ckpt_path: str) -> None:
    """A run from a checkpoint keeps the settings whose state the checkpoint holds (`STATEFUL_SETTINGS`), and does not
    switch one on that the checkpoint has no state for.

    Raises:
        ValueError: naming the flag and the checkpoint's value of it.
    """
    for (key, value), state in STATEFUL_SETTINGS.items():
        was, now = _get(saved, key), _get(given, key)
        if was in (None, MISSING) or now in (None, MISSING) or (was == value) == (now == value):
            continue
        flag = f"--model.{key}"
        fix = f"{flag} {was}" if was == value else f"{flag} {was} (the checkpoint's)"
        raise ValueError(
            f"--ckpt_path {ckpt_path} was trained with model.{key} = {was!r}, and this run sets {now!r}: "
            f"{state} of {value!r} cannot be carried over. Set {fix}, or start a fresh run without --ckpt_path."
        )


def _canonical(key: str, value: Any) -> str:
    value = None if value is MISSING else value
    if key in ("teacher", "student") and value is not None:
        value = to_plain(from_plain(ModelSpec, value))
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else repr(value)


def check_config(subcommand: str, config) -> None:
    """Every check that needs no model: model, data and Trainer settings, held-out prompts, prompt files (their
    responses and lengths, where the settings need them), devices, the rollout engine, and the output folders.

    Args:
        subcommand: `fit`, `validate`, `test` or `predict`.
        config: the subcommand's parsed config (a jsonargparse Namespace).
    """
    model = typed_model_args(config.model.as_dict())
    check_strategy(model["rollout"].engine, config.trainer.strategy)
    data = config.data.as_dict()
    PromptDataModule(**data)
    heldout = heldout_source(data["train"], data["val"])
    if subcommand != "fit" and heldout is None:
        raise ValueError(NO_HELDOUT.format(stage=subcommand))
    train = data["train"] if subcommand == "fit" else None
    sources = [(train, "train"), (heldout, "val")]
    prompts = {  # each source read once, here, so an unreadable or malformed one fails before any other check
        (source, split): load_prompts(source, split, seed=data["seed"], num_val=data["num_val"])
        for source, split in sources
        if source is not None
    }
    check_trainer(config.trainer)
    check_devices(config.trainer.accelerator, model["teacher_placement"].device)
    if model["rollout"].engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError(NO_VLLM)
    if train is not None:
        check_off_policy_responses(model["rollout"], train, prompts[train, "train"])
    check_teacher_names(model["teachers"], prompts)
    if heldout is not None:
        paths = [getattr(model["teacher"], "path", None)] + [t.model.path for t in model["teachers"].values()]
        warn_heldout_tuned_on(paths, prompts[heldout, "val"], data["seed"])
    if model["teachers"]:
        check_one_process(config.trainer)
    if not model.get("truncate_prompts", True):
        check_prompt_lengths(model, prompts)
    check_writable(config.trainer.default_root_dir or os.getcwd(), "--trainer.default_root_dir")
    if subcommand == "fit" and config.checkpoint.dirpath is not None:
        check_writable(config.checkpoint.dirpath, "--checkpoint.dirpath")
    for folder in logger_folders(config.trainer.logger):
        check_writable(folder, "--trainer.logger.init_args.save_dir")


def warn_heldout_tuned_on(teachers: list[str | None], heldout: list[dict[str, Any]], seed: int) -> None:
    """Warn when held-out prompts are prompts the built-in arithmetic teacher was fine-tuned on: another `data.seed`
    splits the same pairs otherwise, so most of its held-out pairs were the teacher's training pairs. The student
    never trains on them, but the teacher's accuracy and the teacher-scored KL on them are flattered.

    Args:
        teachers: the run's teacher paths (`model.teacher`'s and each of `model.teachers`').
    """
    if ARITH_TEACHER not in teachers:
        return
    tuned = {item["prompt"] for item in tuning_examples()}
    seen = sum(item["prompt"] in tuned for item in heldout)
    if seen:
        log.warning(
            "%d of the %d held-out prompts are prompts the teacher %s was fine-tuned on (the training split of "
            "data.seed %d; this run holds out data.seed %d's): its accuracy and the teacher-scored KL there are "
            "flattered. Keep --data.seed %d with this teacher for held-out figures.",
            seen, len(heldout), ARITH_TEACHER, ARITH_SEED, seed, ARITH_SEED,
        )  # fmt: skip


def check_trainer(trainer) -> None:
    """The Trainer's step and epoch limits and gradient accumulation are in range (Lightning checks them only after
    the models have loaded, or not at all: `accumulate_grad_batches: 0` divides by zero at the first step)."""
    for name in ("max_steps", "max_epochs"):
        value = trainer.get(name)
        if value is not None and value < -1:
            what = "optimizer steps" if name == "max_steps" else "epochs"
            raise ValueError(f"--trainer.{name} must be a number of {what} (>= 0) or -1 for no limit, got {value}.")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate < 1:
        raise ValueError(
            f"--trainer.accumulate_grad_batches must be >= 1 (micro-batches per optimizer step; 1 accumulates "
            f"nothing), got {accumulate}."
        )


def check_devices(accelerator, teacher_device: str | None) -> None:
    """The accelerator and the teacher's device exist on this machine."""
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--trainer.accelerator {accelerator}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is "
            "False). Use --trainer.accelerator cpu, or auto to take a GPU when there is one."
        )
    if teacher_device is None or torch.device(teacher_device).type != "cuda":
        return
    index, count = torch.device(teacher_device).index or 0, torch.cuda.device_count()
    if index >= count:
        seen = f"PyTorch sees {count} GPU(s), cuda:0 to cuda:{count - 1}" if count else "PyTorch sees no CUDA GPU"
        raise ValueError(
            f"--model.teacher_placement.device {teacher_device}: {seen}. Drop it (the teacher then shares "
            "the student's device), or name a device that exists."
        )


def check_off_policy_responses(rollout, source: str, items: list[dict[str, Any]]) -> None:
    """When some step is off-policy (`rollout.lmbda` or `lmbda_start` < 1) and not `seq_kd`, off-policy steps read
    each training prompt's `response` (`items`, read from `source`)."""
    if not rollout.mixes or rollout.seq_kd:
        return
    missing = sum(item.get("response") is None for item in items)
    if missing:
        raise ValueError(
            f"--model.rollout.lmbda {rollout.lmbda} takes off-policy responses from the data, and {missing} of "
            f'{len(items)} prompts in {source} have no "response": add one to every line, or set '
            "--model.rollout.seq_kd true to sample them from the teacher."
        )


def check_teacher_names(teachers: dict[str, Any], prompts: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """Every prompt's `teacher` column names a teacher of the run (`model.teachers`, or `default`), so a misspelt name
    fails now rather than at the step that first meets it.

    Args:
        prompts: each (prompt source, split)'s prompts.
    """
    known = {DEFAULT_TEACHER, *teachers}
    for (source, _), items in prompts.items():
        unknown = sorted({item["teacher"] for item in items if item.get("teacher") not in (None, *known)})
        if unknown:
            has = f"model.teachers: {', '.join(teachers)}" if teachers else "model.teachers is not set"
            raise ValueError(
                f"{source}: prompts name the teacher {unknown[0]!r}, which this run does not have ({has}); add it to "
                "model.teachers, or fix the prompts' `teacher` column."
            )


def check_one_process(trainer) -> None:
    """Several teachers train in one process for now (`Distiller.shard` says why): refuse 2+ devices or nodes, given
    as numbers, lists or `auto` (which takes every visible GPU when the accelerator may be a GPU)."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if devices == "auto":
        on_gpu = trainer.get("accelerator") in ("auto", "gpu", "cuda", None) and torch.cuda.is_available()
        devices = torch.cuda.device_count() if on_gpu else 1
    elif isinstance(devices, str):
        devices = len(devices.split(",")) if "," in devices else int(devices)
    count = len(devices) if isinstance(devices, list | tuple) else devices
    if nodes > 1 or (isinstance(count, int) and count != 1):
        raise ValueError(
            f"--model.teachers runs in one process for now (--trainer.devices {trainer.get('devices')}, "
            f"--trainer.num_nodes {nodes}): a step whose prompts skip a teacher leaves its projectors without "
            "gradients, which DDP and FSDP2 refuse. Set --trainer.devices 1 --trainer.num_nodes 1, or train one "
            "teacher."
        )


def check_prompt_lengths(
    model: dict[str, Any], prompts: dict[tuple[str, str], list[dict[str, Any]]], chunk: int = 256
) -> None:
    """With `truncate_prompts: false`, every prompt fits `max_prompt_length` tokens (only the tokenizer loads for
    this; otherwise the first over-long prompt stops the run part-way through training).

    Args:
        prompts: each (prompt source, split)'s prompts.
    """
    tokenizer = pair_tokenizer(model.get("tokenizer"), model["teacher"], model["student"])
    limit = model.get("max_prompt_length", 512)
    for (source, split), items in prompts.items():
        texts = [item["prompt"] for item in items]
        for start in range(0, len(texts), chunk):
            lengths = format_prompts(tokenizer, texts[start : start + chunk])["attention_mask"].sum(dim=1)
            longest = int(lengths.max())
            if longest > limit:
                number = start + int(lengths.argmax()) + 1
                raise ValueError(
                    f"--model.truncate_prompts false: prompt {number} of {source} ({split}) has {longest} tokens, "
                    f"more than --model.max_prompt_length {limit}. Shorten it, raise --model.max_prompt_length, or set "
                    "--model.truncate_prompts true (long prompts are then cut from the left)."
                )


def logger_folders(logger) -> list[str]:
    """The folders the configured logger(s) write to (`save_dir`, or wandb's `dir`), where the config names them."""
    loggers = logger if isinstance(logger, list) else [logger]
    folders = []
    for entry in loggers:
        init_args = entry.get("init_args") if hasattr(entry, "get") else None
        if init_args is None:
            continue
        folder = init_args.get("save_dir") or init_args.get("dir")
        if folder:
            folders.append(str(folder))
    return folders


def check_writable(folder: str | Path, flag: str) -> None:
    """The run can create files in `folder`: logs, checkpoints and exports go there. Nothing is left behind: a folder
    that does not exist yet is checked through its nearest existing parent, which must be a folder it can write."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".oprd-write-check-"):
            pass
    except OSError as err:
        raise ValueError(
            f"{flag} {folder} cannot be written ({err.strerror}): checkpoints and logs go there. Choose a folder you "
            f"can write, e.g. {flag} runs/my-run."
        ) from err
