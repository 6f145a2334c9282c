"""`oprd <subcommand>`: fit / validate / test / predict (the LightningCLI of `oprd.cli.fit`), export and compare."""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from oprd.cli import arguments, errors
from oprd.cli.compare import compare_main
from oprd.cli.fit import build_cli, quiet_startup, show_progress_logs
from oprd.export import DESCRIPTION as EXPORT_DESCRIPTION
from oprd.export import export_main

EPILOG = (
    f"Also: `oprd export --help`: {EXPORT_DESCRIPTION} `oprd compare --help`: compare objectives (hidden-state vs "
    "logit distillation) on one pair, each at its best learning rate."
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def main(args: list[str] | None = None) -> None:
    """`oprd <subcommand> ...`; `--debug` anywhere shows full tracebacks instead of one-line errors."""
    # Tokenizers' thread pool forks badly under DataLoader workers and prints a warning per process.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_progress_logs()
    quiet_startup()
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or bool(os.environ.get("OPRD_DEBUG"))
    argv = arguments.join_negative_numbers([arg for arg in argv if arg != "--debug"])
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself (and DDP re-launches it)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        if command == "export":
            export_main(argv[1:])
            return
        if command == "compare":
            compare_main(argv[1:])
            return
        # A short usage line: the options follow, oprd's (model, data) first, each with its description.
        usage = "%(prog)s [--config CONFIG.yaml ...] [--model.* / --data.* / --trainer.* options]"
        parser_kwargs = {sub: {"exit_on_error": False, "usage": usage} for sub in SUBCOMMANDS}
        build_cli(None if args is None else argv, parser_kwargs={"epilog": EPILOG, **parser_kwargs})
    except SIGTERMException:
        # The checkpoint is saved; exit as a terminated process does, so schedulers do not mistake it for success.
        sys.exit(128 + signal.SIGTERM)
    except errors.USER_ERRORS as error:
        if debug:
            raise
        errors.report(error, command or "")
        sys.exit(1 if isinstance(error, FloatingPointError) else 2)


if __name__ == "__main__":
    main()
