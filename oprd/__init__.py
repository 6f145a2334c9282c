"""oprd: on-policy representation distillation of language models."""

__version__ = "0.1.0"
