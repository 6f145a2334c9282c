"""The built-in demo models (SmolLM2 from a PyPI wheel, and its arithmetic fine-tune): apart from the core, which
only resolves their aliases."""
