"""The demo teacher: SmolLM2-135M-Instruct fine-tuned on the built-in arithmetic task (the quickstart's teacher).

Shape legend:
    b  examples in a batch
    t  prompt + answer tokens (right-padded)

A seeded supervised fine-tune run by a Lightning `Trainer` (AdamW, gradient clipping), on batches drawn in a fixed
order from a seeded `torch.Generator`: the global RNG is never touched, and the teacher is the same on every machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from oprd.data import arithmetic_examples, format_prompts
from oprd.evaluation.metrics import is_correct

log = logging.getLogger(__name__)

# The arithmetic teacher's supervised fine-tune (measured: ~2.5 min on 2 CPU cores).
ARITH_STEPS = 20
ARITH_BATCH = 16
ARITH_LR = 5e-5
ARITH_CLIP = 1.0
ARITH_SEED = 0


def tuning_examples() -> list[dict]:
    """What the teacher is fine-tuned on: the training split of the built-in `arithmetic` at `data.seed` ARITH_SEED."""
    return arithmetic_examples("train", seed=ARITH_SEED)


def sft_batch(tokenizer, items: list[dict]) -> dict[str, torch.Tensor]:
    """Tokenise chat-formatted (prompt, answer) pairs for supervised fine-tuning, loss on the assistant tokens only.

    The prompt goes through `format_prompts` (the exact tokens the distillation rollouts see); the target is the
    item's `response` ("3 + 4 = 7.") followed by EOS so that the model also learns to stop.

    Returns:
        `input_ids`, `attention_mask` and `labels`, all `[b, t]`, right-padded; `labels` is -100 on prompt and pad.
    """
    prompts = format_prompts(tokenizer, [item["prompt"] for item in items])
    rows = []
    for ids, mask, item in zip(prompts["input_ids"], prompts["attention_mask"], items, strict=True):
        target = tokenizer(item["response"], add_special_tokens=False)["input_ids"]
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


def sft_batches(tokenizer, steps: int = ARITH_STEPS, batch_size: int = ARITH_BATCH) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `tuning_examples()`, drawn from seeded shuffled epochs (a fresh permutation each)."""
    items = tuning_examples()
    generator = torch.Generator().manual_seed(ARITH_SEED)
    epochs = -(-steps * batch_size // len(items))
    order = torch.cat([torch.randperm(len(items), generator=generator) for _ in range(epochs)]).tolist()
    return [
        sft_batch(tokenizer, [items[i] for i in order[step * batch_size : (step + 1) * batch_size]])
        for step in range(steps)
    ]


class CausalLMFineTune(L.LightningModule):
    """Supervised fine-tuning of a causal LM on pre-tokenised batches with `labels` (AdamW, constant rate)."""

    def __init__(self, model, lr: float = ARITH_LR) -> None:
        super().__init__()
        self.model, self.lr, self.losses = model, lr, []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        log.info("arith fine-tune step %d/%d: loss %.4f", batch_idx + 1, self.trainer.max_steps, self.losses[-1])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def finetune_arith(model, tokenizer, steps: int = ARITH_STEPS, batch_size: int = ARITH_BATCH) -> list[float]:
    """Seeded supervised fine-tune on `arithmetic_examples("train", seed=0)`; returns the per-step losses."""
    module = CausalLMFineTune(model)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=ARITH_CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = sft_batches(tokenizer, steps, batch_size)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    model.eval()
    return module.losses


@torch.no_grad()
def greedy_accuracy(model, tokenizer, items: list[dict], max_new_tokens: int = 16, batch_size: int = 50) -> float:
    """Fraction of `items` whose greedy response `is_correct` (see `oprd.evaluation.metrics`)."""
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


def build_arith_teacher(base: Path, out: Path) -> dict:
    """Fine-tune the base model in `base` on the arithmetic task and save the result (weights, tokenizer) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
