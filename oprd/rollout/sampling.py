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

from dataclasses import dataclass

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
    """Rollout engine: `hf` (transformers `generate` on the live student), or a name given to `register_engine`."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}.")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}; set do_sample: false for greedy."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}; 1.0 keeps the whole distribution.")


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

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        """The same rollout on `device` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Rollout(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.prompt_length
        )

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


def rollout_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The sampling seed of one micro-batch, derived from its position in the run, not from RNG state, so a resumed
    run samples what the uninterrupted one would have."""
    return (seed * 1_000_003 + epoch * 100_003 + batch_idx * 101 + rank) % (2**63)
