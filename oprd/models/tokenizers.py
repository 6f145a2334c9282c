"""Tokenizers: by name, the one a teacher/student pair shares, and the `tiny` tokenizer built offline.

Teacher and student are compared position by position, so they must share one tokenizer; `pair_tokenizer` checks
the models' own tokenizers whenever both have one, whatever tokenizer the run names.
"""

from __future__ import annotations

import copy
import logging

from transformers import AutoTokenizer, PretrainedConfig

from oprd.models.spec import ModelSpec, local_path
from oprd.models.tiny import TINY_TOKENIZER, tiny_tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(name: str):
    """A tokenizer by hub id, folder, built-in alias, or `tiny` (a small byte-level BPE built offline)."""
    if name == TINY_TOKENIZER:
        return copy.deepcopy(tiny_tokenizer())
    tokenizer = AutoTokenizer.from_pretrained(local_path(ModelSpec(path=name)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer %s has no pad token; using its EOS token %r for padding.", name, tokenizer.eos_token)
    return tokenizer


def own_tokenizer(spec: ModelSpec):
    """The tokenizer saved with a model (None for a random model, or a folder that holds none)."""
    if spec.path is None:
        return None
    try:
        return load_tokenizer(spec.path)
    except (OSError, ValueError, TypeError):
        return None


def pair_tokenizer(name: str | None, teacher: ModelSpec, student: ModelSpec, check: bool = True):
    """The tokenizer of a run: `name` when given, else the student's, else the teacher's, else `tiny`.

    Args:
        check: refuse a teacher and student whose own tokenizers differ (`check_same_tokenizer`), whatever `name`
            says: a shared explicit tokenizer would otherwise hide the mismatch.
    """
    teacher_tok = own_tokenizer(teacher) if check else None
    student_tok = own_tokenizer(student) if check or name is None else None
    if teacher_tok is not None and student_tok is not None:
        check_same_tokenizer(teacher_tok, student_tok)
    if name is not None:
        return load_tokenizer(name)
    if student_tok is not None:
        return student_tok
    return load_tokenizer(teacher.path or TINY_TOKENIZER)


def check_vocab(tokenizer, config: PretrainedConfig, who: str) -> None:
    """The model's embedding must cover the tokenizer (padded vocab sizes are fine: they are sliced later)."""
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"The {who}'s vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}): they "
            "do not belong together. Use the tokenizer of the model family (`model.tokenizer`)."
        )


def check_positions(max_prompt_length: int, max_new_tokens: int, *configs: PretrainedConfig) -> None:
    """Prompt plus response must fit the models' position limit (`max_position_embeddings`), or a run would fail (or
    ask for the memory of a far longer sequence) only when a long prompt arrives."""
    limits = [c.max_position_embeddings for c in configs if getattr(c, "max_position_embeddings", None)]
    if limits and max_prompt_length + max_new_tokens > min(limits):
        raise ValueError(
            f"model.max_prompt_length ({max_prompt_length}) plus the longest response ({max_new_tokens} tokens) is "
            f"{max_prompt_length + max_new_tokens} tokens, more than the models' position limit ({min(limits)}, "
            "max_position_embeddings): lower --model.max_prompt_length or --model.rollout.max_new_tokens."
        )


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Teacher and student must share a tokenizer: hidden states are compared position by position."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
        diff = sorted(set(t.items()) ^ set(s.items()))[:3]
        raise ValueError(
            f"Teacher and student tokenizers differ (vocab sizes {len(t)} vs {len(s)}; e.g. {diff}). oprd compares "
            "them token by token: pick a student from the teacher's family."
        )
