"""The `oprd` command: LightningCLI subcommands (`main`), the checks that run before any model loads (`preflight`),
one-line errors (`errors`), and the `export` subcommand."""

from oprd.cli.fit import OprdCLI
from oprd.cli.main import main

__all__ = ["OprdCLI", "main"]
