"""Write the distilled student as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    oprd export --ckpt_path runs/tiny/checkpoints/last.ckpt --out students/tiny [--config fit.yaml] [--overwrite]

Only the student is rebuilt (from the checkpoint's hyper-parameters) and filled with the trained weights: the teacher,
often many times larger, is never loaded. The folder holds weights, config, generation config and tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from oprd.hparams import from_plain
from oprd.models.lora import frozen_base_keys, is_lora, merged
from oprd.models.spec import ModelSpec, load_config, load_model
from oprd.models.tokenizers import pair_tokenizer
from oprd.training.checkpoint import check_state_shapes, load_checkpoint

STUDENT_PREFIX = "student."
EXPORT_MARKER = "oprd_export.json"
"""Written into every export: the files it holds, so `--overwrite` can tell an earlier export from other files."""


def export_checkpoint(
    ckpt_path: str | Path,
    folder: str | Path,
    overwrite: bool = False,
    model_overrides: Mapping[str, Any] | None = None,
    adapter: bool = False,
) -> Path:
    """Rebuild the student of a checkpoint, load its trained weights and save it as a Hugging Face folder.

    Args:
        ckpt_path: a checkpoint written by `oprd fit`.
        folder: destination; refused when it is not empty, unless `overwrite`.
        overwrite: replace a non-empty `folder`.
        model_overrides: `model` settings that replace the checkpoint's hyper-parameters (e.g. a moved folder).
        adapter: for a LoRA student, write the adapter alone (peft's format) instead of the merged model.
    """
    _refuse_non_empty(Path(folder), overwrite)  # before the (possibly long) checkpoint load
    checkpoint = load_checkpoint(ckpt_path)
    hparams = {**checkpoint["hyper_parameters"], **(model_overrides or {})}
    student, tokenizer = build_student(hparams)
    state = checkpoint["state_dict"]
    weights = {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    frozen = frozen_base_keys(student)
    check_state_shapes(student, weights, f"checkpoint {ckpt_path}", optional=frozen)
    student.load_state_dict(weights, strict=not frozen)  # a LoRA checkpoint holds the adapters, not the base
    return save_folder(student, tokenizer, folder, overwrite, adapter=adapter)


def build_student(hparams: Mapping[str, Any]):
    """The student model and tokenizer that DistillModule builds from the same hyper-parameters, without the teacher.

    Returns:
        `(student, tokenizer)`; the student holds its initial weights.
    """
    teacher, student = from_plain(ModelSpec, hparams["teacher"]), from_plain(ModelSpec, hparams["student"])
    tokenizer = pair_tokenizer(hparams.get("tokenizer"), teacher, student, check=False)
    return load_model(student, load_config(student, len(tokenizer)), tokenizer), tokenizer


def save_folder(model, tokenizer, folder: str | Path, overwrite: bool = False, adapter: bool = False) -> Path:
    """Save weights, config, generation config and tokenizer into `folder` (a LoRA student merged, or with `adapter`
    its adapter alone).

    The folder is written next to its destination and moved into place at the end, so an interrupted export never
    leaves half a model behind. A non-empty folder is refused unless `overwrite` is set, to never lose a user's model.
    """
    folder = Path(folder)
    if adapter and not is_lora(model):
        raise ValueError("--adapter exports a LoRA student's adapter; this student has none (student.lora unset).")
    _refuse_non_empty(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    retired = staging.with_name(staging.name + "-previous")
    try:
        (model if adapter else merged(model)).save_pretrained(staging)
        generation_config(model, tokenizer).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        (staging / EXPORT_MARKER).write_text(json.dumps({"files": files}, indent=2) + "\n")
        if folder.exists():  # a previous export (checked above): swapped out whole, then deleted
            os.replace(folder, retired)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return folder


def generation_config(model, tokenizer):
    """The model's generation config, completed with the tokenizer's EOS and pad tokens (a copy: never mutated).

    Models built from a bare config have no EOS id; without it `generate` would run past the end of every answer,
    unlike training, whose rollouts stop at the tokenizer's EOS.
    """
    config = copy.deepcopy(model.generation_config)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _refuse_non_empty(folder: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder without `overwrite`, and with it anything but a previous export: `overwrite`
    replaces an earlier `oprd export`, never a user's other files (a checkpoint beside it, say)."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; choose a folder for the exported model.")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{folder} is not empty; choose another folder or pass overwrite=True (--overwrite).")
    try:
        exported = set(json.loads((folder / EXPORT_MARKER).read_text())["files"]) | {EXPORT_MARKER}
    except (OSError, ValueError, KeyError):
        exported = set()
    other = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    other = [name for name in other if name not in exported]
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise FileExistsError(
            f"{folder} holds files that no `oprd export` wrote ({', '.join(other[:3])}{more}); --overwrite only "
            "replaces an earlier export. Choose another folder, or move those files first."
        )


# ---- the `oprd export` subcommand ---------------------------------------------------------------------------------

DESCRIPTION = "Write the distilled student of a checkpoint as a Hugging Face folder (weights, config, tokenizer)."


def export_parser():
    """The parser of `oprd export` (also listed in `oprd --help`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="oprd export", description=DESCRIPTION)
    parser.add_argument("--ckpt_path", type=str, required=True, help="Checkpoint written by `oprd fit`.")
    parser.add_argument("--out", type=str, required=True, help="Folder to write; refused when not empty.")
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="A fit config (YAML) whose `model:` settings replace the checkpoint's (e.g. a model folder that moved).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier export in --out.")
    parser.add_argument("--adapter", action="store_true", help="A LoRA student: write the adapter alone (peft).")
    return parser


def model_section(config_path: str | Path) -> dict[str, Any]:
    """The `model:` settings of a fit config (subclass-mode configs nest them under `init_args`)."""
    try:
        config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ValueError(f"Cannot read config {config_path}: {err.strerror}.") from err
    model = config.get("model") or {}
    return dict(model.get("init_args", model))


def export_main(args: list[str]) -> Path:
    """Run `oprd export` with command-line arguments (without the subcommand name)."""
    parsed = export_parser().parse_args(args)
    overrides = model_section(parsed.config) if parsed.config else None
    folder = export_checkpoint(
        parsed.ckpt_path, parsed.out, overwrite=parsed.overwrite, model_overrides=overrides, adapter=parsed.adapter
    )
    print(f"Exported the student of {parsed.ckpt_path} to {folder}")
    return folder
