"""Token-space distillation loss straight from hidden states, without building `[b, t, v]` logits.

Shape legend:
    b    batch (sequences)
    t    tokens (positions in the concatenated prompt + response)
    n    kept (masked-in) tokens, flattened over b and t
    c    tokens in one chunk (<= config.chunk_size)
    d_s  student hidden width
    d_t  teacher hidden width
    v    LM-head rows (possibly padded; logits are sliced to the shared `vocab_size`)

The memory-lean path follows torchtune's chunked losses and Liger's fused linear losses: keep only the response
tokens, then run head + loss one chunk at a time inside `torch.utils.checkpoint`, so a chunk's `[c, v]` student
logits are rebuilt in backward and peak memory grows with the chunk, not with b * t * v. The teacher's chunk logits
are rebuilt there too (no grad): handing them to `checkpoint` as inputs would keep every chunk's `[c, v]` alive
until backward, i.e. the full `[n, v]` teacher logits that the OPRD paper's implementation still paid for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from oprd.losses.token import TokenLossConfig, apply_logit_transforms, slice_vocab, token_loss_per_token, token_loss_sum


@dataclass(frozen=True)
class Head:
    """An output head's parameters, the one head type oprd passes around: `weight [v, d]` and an optional `bias [v]`
    (the tensors themselves, so gradients reach a trained head)."""

    weight: Tensor
    bias: Tensor | None = None

    @classmethod
    def of(cls, head: Head | nn.Module | Tensor) -> Head:
        """A `Head` from a module with `.weight` (and optional `.bias`, e.g. `nn.Linear`), a bare weight, or a Head."""
        if isinstance(head, Head):
            return head
        if isinstance(head, Tensor):
            return cls(head)
        return cls(head.weight, getattr(head, "bias", None))

    def to(self, device: torch.device) -> Head:
        """This head on `device` (itself when it is there already)."""
        if self.weight.device == device:
            return self
        return Head(self.weight.to(device), None if self.bias is None else self.bias.to(device))


def head_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, config: TokenLossConfig, vocab_size: int
) -> Tensor:
    """`[..., d] -> [..., vocab_size]` logits: head, vocabulary slice, then scale / soft-cap."""
    return apply_logit_transforms(slice_vocab(F.linear(hidden, weight, bias), vocab_size), config)


def dense_token_loss_sum(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    targets: Tensor | None,
    mask: Tensor,
    config: TokenLossConfig,
    vocab_size: int,
) -> Tensor:
    """Reference path: full `[b, t, v]` logits for both models, then `token_loss_sum`.

    Args:
        student_hidden: `[b, t, d_s]` final (normed) student hidden states, with gradient.
        student_head: student output head (a `Head`, an `nn.Linear` or a weight `[v, d_s]`).
        teacher_hidden: `[b, t, d_t]` final teacher hidden states (no gradient).
        teacher_head: teacher output head (a `Head`, an `nn.Linear` or a weight `[v, d_t]`).
        targets: `[b, t]` sampled next-token ids (`sampled` estimator only).
        mask: `[b, t]` response mask.
        config: token-loss configuration.
        vocab_size: shared tokenizer vocabulary; extra head rows are dropped.

    Returns:
        Scalar sum over kept tokens.
    """
    student, teacher = Head.of(student_head), Head.of(teacher_head)
    student_logits = head_logits(student_hidden, student.weight, student.bias, config, vocab_size)
    with torch.no_grad():
        teacher_logits = head_logits(teacher_hidden, teacher.weight, teacher.bias, config, vocab_size)
    return token_loss_sum(student_logits, teacher_logits, targets, mask, config)


def _chunk_loss_sum(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    targets: Tensor | None,
    config: TokenLossConfig,
    vocab_size: int,
) -> Tensor:
    """Loss summed over one chunk of `c` kept tokens; `checkpoint` re-runs this body in backward."""
    with torch.no_grad():
        teacher_logits = head_logits(teacher_hidden, teacher_weight, teacher_bias, config, vocab_size)
    student_logits = head_logits(student_hidden, student_weight, student_bias, config, vocab_size)
    return token_loss_per_token(student_logits, teacher_logits, targets, config).sum()


def chunked_token_loss_sum(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    targets: Tensor | None,
    mask: Tensor,
    config: TokenLossConfig,
    vocab_size: int,
) -> Tensor:
    """Memory-lean path: kept tokens only, `config.chunk_size` at a time, student head + loss checkpointed.

    Same arguments and result as `dense_token_loss_sum` (a test proves values and gradients agree). A batch with no
    kept token returns 0 connected to the student's hidden states and head, so every gradient is an exact zero.
    """
    if config.chunk_size < 1:
        raise ValueError(f"chunked_token_loss_sum needs chunk_size >= 1, got {config.chunk_size}.")
    keep = rearrange(mask.bool(), "b t -> (b t)")
    student = rearrange(student_hidden, "b t d -> (b t) d")[keep]  # [n, d_s]
    teacher = rearrange(teacher_hidden.detach(), "b t d -> (b t) d")[keep]  # [n, d_t]
    kept_targets = None if targets is None else rearrange(targets, "b t -> (b t)")[keep]  # [n]
    student_head, teacher_head = Head.of(student_head), Head.of(teacher_head)
    student_weight, student_bias = student_head.weight, student_head.bias
    teacher_weight, teacher_bias = teacher_head.weight, teacher_head.bias
    sums = []
    # max(n, 1): an all-masked batch still runs one empty chunk, which yields 0 and zero (not missing) gradients.
    for start in range(0, max(student.shape[0], 1), config.chunk_size):
        chunk = slice(start, start + config.chunk_size)
        sums.append(
            checkpoint(
                _chunk_loss_sum,
                student[chunk],
                student_weight,
                student_bias,
                teacher[chunk],
                teacher_weight.detach(),
                None if teacher_bias is None else teacher_bias.detach(),
                None if kept_targets is None else kept_targets[chunk],
                config,
                vocab_size,
                use_reentrant=False,
            )
        )
    return torch.stack(sums).sum()


def token_loss_sum_from_hidden(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    targets: Tensor | None,
    mask: Tensor,
    config: TokenLossConfig,
    vocab_size: int,
) -> Tensor:
    """Token-space loss sum from final hidden states: dense when `config.chunk_size == 0`, chunked otherwise."""
    fn = dense_token_loss_sum if config.chunk_size == 0 else chunked_token_loss_sum
    return fn(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, config, vocab_size)


@torch.no_grad()
def sampled_logprobs(
    hidden: Tensor, head: Head, targets: Tensor, mask: Tensor, config: TokenLossConfig, vocab_size: int
) -> Tensor:
    """The model's own log-probability of each kept target token, `[n]`, computed `config.chunk_size` tokens at a time
    (full-vocabulary log-softmax at temperature 1: what a rollout engine reports as the sampled token's log-prob).

    Args:
        hidden: `[b, t, d]` final normed states; position t predicts `targets[:, t]`.
        targets: `[b, t]` next-token ids.
        mask: `[b, t]` the positions that count.
    """
    keep = rearrange(mask.bool(), "b t -> (b t)")
    states = rearrange(hidden, "b t d -> (b t) d")[keep]
    wanted = rearrange(targets, "b t -> (b t)")[keep]
    head = Head.of(head)
    weight, bias = head.weight, head.bias
    step = config.chunk_size or max(states.shape[0], 1)
    out = []
    for start in range(0, states.shape[0], step):
        logits = head_logits(states[start : start + step], weight, bias, config, vocab_size).float()
        out.append(F.log_softmax(logits, dim=-1).gather(-1, wanted[start : start + step, None])[:, 0])
    return torch.cat(out) if out else states.new_zeros(0)
