"""On-policy rollouts: the student samples responses to left-padded prompts, with KV cache, under no_grad.

Shape legend:
    b  batch of prompts
    n  generations per prompt
    p  prompt tokens (left-padded)
    r  response tokens (right-padded after EOS)
    t  p + r

`rollout` is Hugging Face `generate` on the live student: it needs no weight sync and works on CPU and under DDP /
FSDP2 (with `synced_gpus`). Engines (`oprd.rollout.engine`) wrap it or replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from einops import repeat
from torch import Tensor, nn


@dataclass(frozen=True)
class RolloutConfig:
    """How the student samples its own responses."""

    max_new_tokens: int = 32
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature (on-policy: 1.0 samples the student's own distribution)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 keeps the full distribution."""
    num_generations: int = 1
    """Responses sampled per prompt."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    engine: str = "hf"
    """Rollout engine: `hf` (transformers `generate` on the live student), `vllm` (an in-process vLLM engine with a
    copy of the student's weights), or a name given to `register_engine`."""
    lmbda: float = 1.0
    """GKD's lambda (arXiv 2306.13649): the fraction of steps whose responses the student samples itself; the rest are
    off-policy: the data's `response` (or, with `seq_kd`, the teacher's samples)."""
    lmbda_start: float | None = None
    """The on-policy fraction at the first step, when it changes over the run: a warm start on off-policy responses
    that turns into on-policy distillation in one run (e.g. 0.0, with `lmbda: 1.0`); None: `lmbda` at every step."""
    lmbda_steps: int = 0
    """Optimizer steps over which the on-policy fraction goes from `lmbda_start` to `lmbda` (see `lmbda_schedule`)."""
    lmbda_schedule: Literal["linear", "step"] = "linear"
    """`linear`: the fraction rises linearly over `lmbda_steps`; `step`: `lmbda_start` for `lmbda_steps` steps, then
    `lmbda` (two phases)."""
    seq_kd: bool = False
    """Off-policy steps sample their responses from the teacher (sequence-level KD) instead of reading the data's."""
    sync_every: int = 1
    """Copy the student's weights into an engine that keeps its own (`vllm`) every N optimizer steps."""
    vllm_kv_cache_gb: float = 1.0
    """vLLM on CPU: memory for its KV cache (GiB)."""
    vllm_gpu_memory: float = 0.3
    """vLLM on a GPU: the fraction of GPU memory it may take (weights and KV cache)."""
    vllm_sleep: bool = True
    """vLLM on a GPU: sleep between rollouts, so its memory is free while the trainer updates."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}.")
        if not math.isfinite(self.temperature) or (self.do_sample and self.temperature <= 0):
            raise ValueError(
                f"temperature must be > 0 and finite when sampling, got {self.temperature}; 1.0 samples the model's "
                "own distribution (set do_sample: false for greedy)."
            )
        if not self.do_sample and self.num_generations > 1:
            raise ValueError(
                f"num_generations must be 1 with do_sample: false (greedy decoding would give {self.num_generations} "
                f"copies of one response), got {self.num_generations}; set do_sample: true to sample several."
            )
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must lie in [0, 1] (1: every step on-policy), got {self.lmbda}.")
        if self.lmbda_start is not None:
            if not 0 <= self.lmbda_start <= 1:
                raise ValueError(f"lmbda_start must lie in [0, 1], got {self.lmbda_start}.")
            if self.lmbda_steps < 1:
                raise ValueError(
                    f"lmbda_start needs lmbda_steps >= 1 (the steps it takes to reach lmbda), got {self.lmbda_steps}."
                )
        if self.lmbda_steps < 0:
            raise ValueError(f"lmbda_steps must be >= 0, got {self.lmbda_steps}.")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {self.sync_every}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}; 1.0 keeps the whole distribution.")

    def lmbda_at(self, step: int) -> float:
        """The on-policy fraction of optimizer step `step` (0-based): a function of the step alone, so every rank and
        a resumed run take the same."""
        if self.lmbda_start is None or step >= self.lmbda_steps:
            return self.lmbda
        if self.lmbda_schedule == "step":
            return self.lmbda_start
        return self.lmbda_start + (self.lmbda - self.lmbda_start) * step / self.lmbda_steps

    @property
    def mixes(self) -> bool:
        """Whether some step may take off-policy responses."""
        return min(self.lmbda, 1.0 if self.lmbda_start is None else self.lmbda_start) < 1

    def greedy(self, max_new_tokens: int | None = None) -> RolloutConfig:
        """One greedy response per prompt (held-out scoring, predictions), `max_new_tokens` long (default: ours)."""
        return replace(self, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False, num_generations=1)


@dataclass
class Rollout:
    """A batch of prompt + response sequences."""

    input_ids: Tensor
    """`[b*n, t]` prompt and response tokens."""
    attention_mask: Tensor
    """`[b*n, t]` 1 on real tokens (prompt and response up to and including EOS)."""
    response_mask: Tensor
    """`[b*n, t]` 1 on response tokens up to and including the first EOS; 0 on prompt and padding."""
    prompt_length: int
    """p: the response starts at this position."""
    logprobs: Tensor | None = None
    """`[b*n, t]` the engine's log-probability of each sampled response token (0 elsewhere), when it reports them."""

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        """The same rollout on `device` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        logprobs = None if self.logprobs is None else self.logprobs.to(device)
        masks = (self.attention_mask.to(device), self.response_mask.to(device))
        return Rollout(self.input_ids.to(device), *masks, self.prompt_length, logprobs)

    def select(self, rows: list[int]) -> Rollout:
        """The rollout of `rows` alone (in that order)."""
        index = torch.tensor(rows, device=self.input_ids.device)
        logprobs = None if self.logprobs is None else self.logprobs[index]
        masks = (self.attention_mask[index], self.response_mask[index])
        return Rollout(self.input_ids[index], *masks, self.prompt_length, logprobs)

    def responses(self) -> list[Tensor]:
        """Each sequence's response tokens (without padding)."""
        return [row[mask.bool()] for row, mask in zip(self.input_ids, self.response_mask, strict=True)]


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token id that ends a response (generation config first, then the tokenizer)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [i for i in ids if i is not None]


def response_mask(responses: Tensor, eos: list[int]) -> Tensor:
    """`[b, r]` mask of response tokens up to and including the first EOS (everything after it is padding)."""
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~seen_before).long()


@torch.no_grad()
def rollout(
    model: nn.Module,
    tokenizer,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: RolloutConfig,
    seed: int | None = None,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample `num_generations` responses per prompt from `model` in eval mode, restoring its mode after.

    Args:
        input_ids: `[b, p]` left-padded prompts.
        attention_mask: `[b, p]`.
        seed: seeds the sampling RNG (forked, so the caller's RNG state is untouched) for reproducible rollouts.
        synced_gpus: keep sharded ranks in lock-step until all finish (FSDP / DeepSpeed).
    """
    n = config.num_generations
    input_ids = repeat(input_ids, "b p -> (b n) p", n=n)
    attention_mask = repeat(attention_mask, "b p -> (b n) p", n=n)
    eos = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sampling = {"temperature": config.temperature, "top_p": config.top_p} if config.do_sample else {}
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=config.max_new_tokens,
                do_sample=config.do_sample,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=synced_gpus,
                **sampling,
            )
    finally:
        model.train(was_training)
    prompt_length = input_ids.shape[1]
    responses = out[:, prompt_length:]
    resp_mask = response_mask(responses, eos)
    prompt_zeros = torch.zeros_like(attention_mask)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([attention_mask, resp_mask], dim=1),
        response_mask=torch.cat([prompt_zeros, resp_mask], dim=1),
        prompt_length=prompt_length,
    )


def rollout_from_responses(
    tokenizer, input_ids: Tensor, attention_mask: Tensor, responses: list[str], eos: list[int], max_new_tokens: int
) -> Rollout:
    """A `Rollout` of given responses (off-policy: from the data) in the layout `rollout` returns: each response's
    tokens, then EOS, cut at `max_new_tokens`, right-padded.

    Args:
        input_ids: `[b, p]` left-padded prompts, one per response.
    """
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"][: max_new_tokens - 1] + eos[:1] for text in responses
    ]
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row, dtype=input_ids.dtype)
    resp_mask = (
        torch.arange(width, device=input_ids.device)
        < torch.tensor([len(r) for r in rows], device=input_ids.device)[:, None]
    ).long()
    return Rollout(
        input_ids=torch.cat([input_ids, padded], dim=1),
        attention_mask=torch.cat([attention_mask, resp_mask], dim=1),
        response_mask=torch.cat([torch.zeros_like(attention_mask), resp_mask], dim=1),
        prompt_length=input_ids.shape[1],
    )


def rollout_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The sampling seed of one micro-batch, derived from its position in the run, not from RNG state, so a resumed
    run samples what the uninterrupted one would have."""
    return (seed * 1_000_003 + epoch * 100_003 + batch_idx * 101 + rank) % (2**63)
