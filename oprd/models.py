"""Model references: Hugging Face ids, local folders, built-in aliases, or random models built from a config.

Configs are resolved first and validated (layer map, vocabulary) before any weights are loaded, so a bad config
fails in seconds, not after the teacher has loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from oprd.prune import check_keep_layers, every_kth, prune_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


@dataclass
class ModelSpec:
    """Where a teacher or student comes from."""

    path: str | None = None
    """Hugging Face id (`Qwen/Qwen3-0.6B`), local folder, or built-in alias (`smollm2-135m-instruct`)."""
    config: dict[str, Any] | None = None
    """Instead of `path`: transformers config fields (with `model_type`) of a randomly initialised model."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed of the random initialisation when built from `config`."""
    keep_layers: list[int] | None = None
    """Depth-prune: keep only these decoder layers (e.g. [0, 2, 4]); pair with `layer_map: pruned`."""
    keep_every: int | None = None
    """Depth-prune: keep every k-th decoder layer (0, k, 2k, ...); pair with `layer_map: pruned`."""
    layers_path: str | None = None
    """Dotted path to the decoder layers when oprd cannot find them (e.g. `model.layers`)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("A model needs exactly one of `path` (id, folder or built-in alias) or `config`.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("A model built from `config` needs `model_type` (e.g. llama, qwen3, mistral).")
        if self.keep_layers is not None and self.keep_every is not None:
            raise ValueError("Give `keep_layers` or `keep_every`, not both.")

    @property
    def pruned(self) -> bool:
        return self.keep_layers is not None or self.keep_every is not None

    def kept_layers(self, num_layers: int) -> list[int] | None:
        """The kept decoder layers of a depth-pruned model, validated against the unpruned depth."""
        if self.keep_every is not None:
            return every_kth(num_layers, self.keep_every)
        return None if self.keep_layers is None else check_keep_layers(list(self.keep_layers), num_layers)

    def describe(self) -> str:
        return self.path or f"random {self.config['model_type']} {self.config}"


def local_path(spec: ModelSpec) -> str:
    """The folder or hub id to load from, building a built-in alias on first use."""
    from oprd import builtin

    if spec.path in builtin.BUILTIN_MODELS:
        return str(builtin.resolve_builtin(spec.path))
    if spec.path.startswith((".", "/", "~")) and not Path(spec.path).expanduser().exists():
        raise ValueError(
            f"Model folder {spec.path} does not exist; check the path (or use a hub id or built-in alias)."
        )
    return spec.path


def load_config(spec: ModelSpec, vocab_size: int | None = None) -> PretrainedConfig:
    """The model's config, without loading weights (random models get the tokenizer's vocab size by default)."""
    if spec.config is not None:
        fields = dict(spec.config)
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    else:
        try:
            config = AutoConfig.from_pretrained(local_path(spec), trust_remote_code=spec.trust_remote_code)
        except OSError as err:
            raise ValueError(f"Cannot load the config of model {spec.path!r}: {err}") from err
    keep = spec.kept_layers(config.num_hidden_layers)
    if keep is not None:
        config = pruned_config(config, keep)
    return config


def load_model(spec: ModelSpec, config: PretrainedConfig) -> torch.nn.Module:
    """Load (or randomly build) the causal LM described by `spec`, depth-pruned when it asks for that.

    `config` is the (possibly pruned) config from `load_config`; a pruned model is loaded whole, then pruned.
    """
    dtype = DTYPES[spec.dtype]
    keep = pruned_from(spec, config.vocab_size)
    full_config = config if keep is None else load_config(_unpruned(spec), config.vocab_size)
    if spec.config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(full_config), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            local_path(spec), config=full_config, dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
    if keep is not None:
        model = prune_layers(model, keep)
    log.info("Loaded %s (%.1fM parameters)", spec.describe(), sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _unpruned(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, keep_layers=None, keep_every=None)


def pruned_from(spec: ModelSpec, vocab_size: int | None = None) -> list[int] | None:
    """The teacher-side indices of the layers a depth-pruned model keeps; None when it is not pruned."""
    if not spec.pruned:
        return None
    return spec.kept_layers(load_config(_unpruned(spec), vocab_size).num_hidden_layers)


def pruned_config(config: PretrainedConfig, keep: list[int]) -> PretrainedConfig:
    """The config of a model that keeps only `keep` of its decoder layers."""
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return config


def load_tokenizer(name: str):
    """A tokenizer by hub id, folder, built-in alias, or `tiny` (a small byte-level BPE built offline)."""
    if name == TINY_TOKENIZER:
        return copy.deepcopy(tiny_tokenizer())
    tokenizer = AutoTokenizer.from_pretrained(local_path(ModelSpec(path=name)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer %s has no pad token; using its EOS token %r for padding.", name, tokenizer.eos_token)
    return tokenizer


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
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=_CHATML,
    )


def check_vocab(tokenizer, config: PretrainedConfig, who: str) -> None:
    """The model's embedding must cover the tokenizer (padded vocab sizes are fine: they are sliced later)."""
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"The {who}'s vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}): they "
            "do not belong together. Use the tokenizer of the model family (`model.tokenizer`)."
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
