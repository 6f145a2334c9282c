"""The tiny random models and offline tokenizer of `configs/tiny.yaml`, tests and `--quick` benchmarks."""

from __future__ import annotations

import functools
from typing import Any

from transformers import PreTrainedTokenizerFast

TINY_TOKENIZER = "tiny"
# The random models of configs/tiny.yaml: a 4-layer/64-wide Llama teacher and a 2-layer/32-wide student, so the
# projectors map between unequal widths. Tests and `benchmarks --quick` build them.
TINY_TEACHER: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TINY_STUDENT: dict[str, Any] = {**TINY_TEACHER, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}

_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = [f"What is {a} plus {b}? {a} + {b} = {a + b}." for a in range(1, 21) for b in range(1, 21)] + [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation teaches a small student to imitate a large teacher, one hidden state at a time.",
    "Hello! How can I help you today? Let me think step by step about the answer.",
]


@functools.cache
def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with a ChatML template, trained offline in milliseconds for tests and demos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar prints blank lines on every run when stdout is not a terminal
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=_CHATML,
    )
