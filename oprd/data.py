"""Prompt data: JSONL files, local Hugging Face `datasets` folders and the built-in arithmetic task.

Items are plain dicts `{"prompt": str, "answer": str | None, "response": str | None}`, with `teacher` when the item
names one (`model.teachers`); batches are dicts of lists. Tokenisation (with the tokenizer's chat template) happens in
`format_prompts`, called by the LightningModule, because the tokenizer belongs to the models, not to the data.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("arithmetic", "arithmetic-large", "arithmetic-rephrased", "arithmetic-wide", "arithmetic-varied")
TRAINING_RANGE = (1, 20)
"""The operands of the built-in `arithmetic` task (both splits): the demo teacher was fine-tuned on these."""
LARGE_RANGE = (21, 40)
"""The operands of `arithmetic-large` and `arithmetic-rephrased`: outside `TRAINING_RANGE`, so neither set shares a
pair with the training split or with the held-out split that picks a comparison's learning rate, whatever the seed."""
REPHRASINGS = (
    "Add {a} and {b}.",
    "What's {a}+{b}?",
    "Compute {a} + {b}.",
    "What do you get when you add {a} to {b}?",
    "Calculate the sum of {a} and {b}.",
    "Tom has {a} apples and buys {b} more. How many apples does he have now?",
    "A shelf holds {a} books and {b} more are put on it. How many books are on the shelf?",
    "{a} plus {b} equals what?",
)
"""Other ways to ask "What is a plus b?": a held-out check that distillation taught addition, not one phrasing."""
TRAINED_REPHRASINGS = REPHRASINGS[0::2]
"""The rephrasings `arithmetic-varied` trains on (on pairs of its own); the other half no built-in trains on, so
`arithmetic-rephrased` holds phrasings a student has seen and phrasings it has not, every other prompt."""


def arithmetic_examples(
    split: str = "train", seed: int = 0, num_val: int = 100, low: int = TRAINING_RANGE[0], high: int = TRAINING_RANGE[1]
):
    """The built-in arithmetic task: "What is a plus b?" with the answer kept for scoring.

    All pairs (a, b) with low <= a, b <= high are shuffled with `seed`; the first `num_val` are held out, so the
    training and validation splits never share a pair.

    Returns:
        list of `{"prompt": ..., "answer": ...}` dicts.
    """
    return [sum_example("What is {a} plus {b}?", a, b) for a, b in split_pairs(split, seed, num_val, low, high)]


def sum_example(phrasing: str, a: int, b: int) -> dict[str, Any]:
    """The sum a + b asked in `phrasing` (a format string of `a` and `b`), with its answer and reference response."""
    return {"prompt": phrasing.format(a=a, b=b), "answer": str(a + b), "response": f"{a} + {b} = {a + b}."}


def split_pairs(split: str, seed: int, num_val: int, low: int, high: int) -> list[tuple[int, int]]:
    """Every pair (a, b) with low <= a, b <= high, shuffled with `seed`: the first `num_val` for `val`, the rest
    otherwise."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    if not 0 < num_val < len(pairs):
        raise ValueError(f"num_val must be between 1 and {len(pairs) - 1} for numbers {low}..{high}, got {num_val}.")
    random.Random(seed).shuffle(pairs)
    return pairs[:num_val] if split == "val" else pairs[num_val:]


def large_examples(split: str = "train", seed: int = 0, num_val: int = 100) -> list[dict[str, Any]]:
    """Sums outside the training range: "What is a plus b?" with 21 <= a, b <= 40 (`LARGE_RANGE`), split as
    `arithmetic_examples` splits its pairs."""
    return arithmetic_examples(split, seed=seed, num_val=num_val, low=LARGE_RANGE[0], high=LARGE_RANGE[1])


def rephrased_examples(split: str = "train", seed: int = 0, num_val: int = 100) -> list[dict[str, Any]]:
    """`large_examples`' pairs, each asked in one of `REPHRASINGS` (in turn).

    Its own pairs, not the held-out split's: a set that asked the selection split's pairs again would not be
    independent of the learning rate chosen on them. The same pairs as `arithmetic-large`, so that comparing the two
    separates the phrasing from the larger numbers.
    """
    return [
        {"prompt": REPHRASINGS[i % len(REPHRASINGS)].format(a=a, b=b), "answer": str(a + b)}
        for i, (a, b) in enumerate(split_pairs(split, seed, num_val, *LARGE_RANGE))
    ]


def wide_examples(split: str = "train", seed: int = 0, num_val: int = 100) -> list[dict[str, Any]]:
    """Sums over both ranges for training: the training splits of `arithmetic` and `arithmetic-large`, each with its
    reference answer; held out, `arithmetic`'s held-out split. Neither split shares a pair with the held-out splits of
    `arithmetic-large` or `arithmetic-rephrased`, and no prompt is in another phrasing."""
    if split == "val":
        return arithmetic_examples("val", seed=seed, num_val=num_val)
    return [sum_example("What is {a} plus {b}?", a, b) for a, b in both_ranges(split, seed, num_val)]


def both_ranges(split: str, seed: int, num_val: int) -> list[tuple[int, int]]:
    """The pairs of `arithmetic` then of `arithmetic-large` in `split` (`split_pairs` of each range)."""
    return split_pairs(split, seed, num_val, *TRAINING_RANGE) + split_pairs(split, seed, num_val, *LARGE_RANGE)


def varied_examples(split: str = "train", seed: int = 0, num_val: int = 100) -> list[dict[str, Any]]:
    """`wide_examples`, plus each of its training pairs asked again in one of `TRAINED_REPHRASINGS` (in turn), with
    the same reference answer; held out, `arithmetic`'s held-out split. No pair of `arithmetic-large` or
    `arithmetic-rephrased`'s held-out splits is trained on, nor any phrasing of `REPHRASINGS[1::2]`."""
    wide = wide_examples(split, seed=seed, num_val=num_val)
    if split == "val":
        return wide
    phrasings = itertools.cycle(TRAINED_REPHRASINGS)
    return wide + [sum_example(next(phrasings), a, b) for a, b in both_ranges(split, seed, num_val)]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read `{"prompt": ..., "answer": ...}` lines, with errors that name the file and line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not a prompt
    except OSError as err:
        raise ValueError(
            f"Cannot read prompt file {path}: {err.strerror}. Check the path in `data.train`/`data.val`."
        ) from err
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}). Save the file as UTF-8."
        ) from err
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({err.msg}). Each line must be one JSON object."
            ) from err
        if not isinstance(item, dict):
            raise ValueError(
                f'{path}:{number}: expected an object like {{"prompt": "..."}}, got {type(item).__name__}.'
            )
        items.append(_check_item(item, f"{path}:{number}"))
    if not items:
        raise ValueError(f'Prompt file {path} holds no prompts; write one JSON object per line: {{"prompt": "..."}}.')
    return items


def _check_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f'{where}: missing a non-empty "prompt" string (keys found: {sorted(item)}).')
    answer, response, teacher = item.get("answer"), item.get("response"), item.get("teacher")
    if response is not None and not isinstance(response, str):
        raise ValueError(f'{where}: "response" must be a string (a reference answer for off-policy steps).')
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(f'{where}: "teacher" must be a string naming one of model.teachers (or absent).')
    item = {"prompt": prompt, "answer": None if answer is None else str(answer), "response": response}
    if teacher:  # which teacher the prompt learns from (`model.teachers`); absent: `model.teacher`
        item["teacher"] = teacher
    return item


def load_prompts(source: str, split: str = "train", seed: int = 0, num_val: int = 100) -> list[dict[str, Any]]:
    """Load prompts from a built-in name, a `.jsonl` file or a folder written by `datasets.save_to_disk`."""
    if source == "arithmetic":
        return arithmetic_examples(split, seed=seed, num_val=num_val)
    if source == "arithmetic-large":
        return large_examples(split, seed=seed, num_val=num_val)
    if source == "arithmetic-rephrased":
        return rephrased_examples(split, seed=seed, num_val=num_val)
    if source == "arithmetic-wide":
        return wide_examples(split, seed=seed, num_val=num_val)
    if source == "arithmetic-varied":
        return varied_examples(split, seed=seed, num_val=num_val)
    path = Path(source)
    if path.is_dir():
        return _load_hf_folder(path, split)
    if path.suffix == ".jsonl" or path.is_file():
        return read_jsonl(path)
    raise ValueError(
        f"Prompt source {source!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}), a JSONL file nor a "
        "`datasets` folder. Check the path."
    )


def _load_hf_folder(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"Dataset folder {path} has splits {list(data)}, not {split!r}.")
        data = data[split]
    items = [_check_item(dict(row), f"{path} row {i}") for i, row in enumerate(data)]
    if not items:
        raise ValueError(f"Dataset folder {path} holds no rows.")
    return items


def collate(items: list[dict[str, Any]]) -> dict[str, list]:
    """A batch as lists; `teacher` only when some item names one (`model.teachers`)."""
    keys = ("prompt", "answer", "response", *(("teacher",) if any(item.get("teacher") for item in items) else ()))
    return {key: [item.get(key) for item in items] for key in keys}


def format_prompts(tokenizer, prompts: list[str], max_length: int | None = None, truncate: bool = True):
    """Apply the chat template (when the tokenizer has one) and tokenise with left padding.

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token.
        prompts: user messages.
        max_length: longest prompt in tokens; longer prompts are cut from the left (`truncate=True`, with a
            warning) or refused.

    Returns:
        `input_ids` and `attention_mask`, both `[b, t]`, left-padded.
    """
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    else:
        texts = list(prompts)
    # Left padding per call: the tokenizer is shared (and saved by `oprd export`), so its own setting stays as it is.
    encoded = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not tokenizer.chat_template
    )
    if max_length is not None and encoded["input_ids"].shape[1] > max_length:
        longest = int(encoded["attention_mask"].sum(dim=1).max())
        if longest > max_length and not truncate:
            raise ValueError(
                f"A prompt has {longest} tokens, more than max_prompt_length={max_length}. Shorten it, raise "
                "`model.max_prompt_length`, or set `model.truncate_prompts: true`."
            )
        if longest > max_length:
            log.warning("Prompts longer than %d tokens are truncated from the left (longest: %d).", max_length, longest)
        encoded = {k: v[:, -max_length:] for k, v in encoded.items()}
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


NO_HELDOUT = (
    "oprd {stage} answers held-out prompts, and there are none: set --data.val to a JSONL file of "
    '{{"prompt": ..., "answer": ...}} lines (or train on a built-in task, which holds some out).'
)


def heldout_source(train: str | None, val: str | None) -> str | None:
    """Where held-out prompts come from: `val`, else the held-out split of a built-in `train` task, else nowhere."""
    if val is not None:
        return val
    return train if train in BUILTIN_SOURCES else None


class ResumableSampler(DistributedSampler):
    """Shuffles each epoch with `seed + epoch`, shards by rank, and can start an epoch part-way after a resume.

    A `DistributedSampler`, so Lightning does not wrap it in its own under DDP (which would lose the position).
    """

    def __init__(self, items, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0
        """Indices of this epoch that a checkpointed run already consumed; skipped once, by the next iteration."""

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


def check_position(state: dict[str, int], batch_size: int, ranks: int | None, flag: str = "--ckpt_path") -> None:
    """A saved data position counts batches of one batch size on one number of ranks: refuse a resume mid-epoch
    with other ones.

    Another batch size would start the resumed epoch at another prompt (3 steps at batch 4, then batch 8, start at
    prompt 24: prompts 12-23 are never seen), and another rank count shards the epoch differently.

    Args:
        ranks: the run's process count, or None when not known yet (checked again when the loader restores).

    Raises:
        ValueError: naming the saved and the given value and the fix.
    """
    if not state.get("batches"):
        return  # at the start of an epoch: nothing to skip
    saved_batch, saved_ranks = state.get("batch_size"), state.get("ranks")  # absent from older checkpoints
    if saved_batch is not None and saved_batch != batch_size:
        raise ValueError(
            f"{flag} stopped {state['batches']} batches into an epoch at data.batch_size {saved_batch}, but this run "
            f"sets {batch_size}: its place in the epoch counts batches of {saved_batch}, so prompts would be skipped. "
            f"Resume with --data.batch_size {saved_batch}."
        )
    if ranks is not None and saved_ranks is not None and saved_ranks != ranks:
        raise ValueError(
            f"{flag} stopped mid-epoch on {saved_ranks} processes (devices x nodes), but this run has {ranks}: each "
            "process reads its own share of the epoch, so prompts would be skipped or repeated. Resume with "
            f"{saved_ranks} processes (--trainer.devices, --trainer.num_nodes)."
        )


class ResumableLoader(DataLoader):
    """A DataLoader that knows how many batches of the epoch it has handed out, and can continue from there.

    Lightning saves `state_dict()` of a stateful train loader in every checkpoint and calls `load_state_dict` before
    iterating on resume. It does not prefetch from sized loaders, so the batches counted here are exactly those that
    reached a training step: a resumed run sees the rest of the epoch in the uninterrupted run's order.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0

    def __iter__(self) -> Iterator:
        self._served = self.sampler.start // self.batch_size
        return self._counted(super().__iter__())

    def _counted(self, batches) -> Iterator:
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # The batch size and rank count say what a batch is: the position means nothing under others.
        replicas = self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "batches": self._served, "batch_size": self.batch_size, "ranks": replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_position(state, self.batch_size, self.sampler.num_replicas)
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved after the epoch's last batch: the next epoch starts at its beginning
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = batches * self.batch_size


class PromptDataModule(L.LightningDataModule):
    """Prompts for on-policy distillation: the student writes the responses, so only prompts are needed.

    Args:
        train: `arithmetic`, a JSONL file of `{"prompt": ..., "answer": ...}` lines, or a `datasets` folder.
        val: same kinds as `train`; `None` uses the built-in held-out split when `train` is built-in.
        batch_size: prompts per micro-batch (each is sampled `num_generations` times by the model).
        val_batch_size: prompts per validation batch.
        num_val: held-out prompts of a built-in task.
        max_val_prompts: evaluate on at most this many validation prompts (None = all).
        seed: shuffling (epoch e is shuffled with seed + e, so a resumed run sees the same order) and built-in splits.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train: str = "arithmetic",
        val: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 16,
        num_val: int = 100,
        max_val_prompts: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}.")
        if max_val_prompts is not None and max_val_prompts < 1:
            raise ValueError(f"data.max_val_prompts must be >= 1 or null (all), got {max_val_prompts}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.train_items: list[dict[str, Any]] = []
        self.val_items: list[dict[str, Any]] = []

    @property
    def hparams_initial(self) -> AttributeDict:
        """The settings loggers record, under `data`: Lightning merges them with the model's into one dict and refuses
        a key both have with different values, and both have a `seed` (`--model.seed 5` would stop every run)."""
        return AttributeDict(data={k: v for k, v in super().hparams_initial.items() if not k.startswith("_")})

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if not self.train_items and stage in (None, "fit"):
            self.train_items = load_prompts(hp.train, "train", seed=hp.seed, num_val=hp.num_val)
        if not self.val_items:
            source = heldout_source(hp.train, hp.val)
            if source is None and stage in ("validate", "test", "predict"):
                raise ValueError(NO_HELDOUT.format(stage=stage))
            if source is not None:
                self.val_items = load_prompts(source, "val", seed=hp.seed, num_val=hp.num_val)
            self.val_items = self.val_items[: hp.max_val_prompts]

    def train_dataloader(self) -> ResumableLoader:
        hp, trainer = self.hparams, self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_items, seed=hp.seed, num_replicas=replicas, rank=rank)
        return ResumableLoader(
            self.train_items,
            batch_size=hp.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= hp.batch_size,
            # Worker seeds come from this generator, not from the global RNG, which iterating would otherwise advance.
            generator=torch.Generator().manual_seed(hp.seed),
            collate_fn=collate,
            num_workers=hp.num_workers,
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.hparams.val_batch_size, collate_fn=collate)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader() if self.val_items else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()
