"""Models: where they come from (`spec`), their layers (`layers`), hidden-state capture (`capture`), depth pruning
(`prune`), tokenizers and the tiny offline models."""

from oprd.models.spec import DTYPES, ModelSpec, load_config, load_model, local_path, pruned_from
from oprd.models.tiny import TINY_STUDENT, TINY_TEACHER, TINY_TOKENIZER, tiny_tokenizer
from oprd.models.tokenizers import check_same_tokenizer, check_vocab, load_tokenizer, pair_tokenizer

__all__ = [
    "DTYPES",
    "TINY_STUDENT",
    "TINY_TEACHER",
    "TINY_TOKENIZER",
    "ModelSpec",
    "check_same_tokenizer",
    "check_vocab",
    "load_config",
    "load_model",
    "load_tokenizer",
    "local_path",
    "pair_tokenizer",
    "pruned_from",
    "tiny_tokenizer",
]
