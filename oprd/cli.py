"""The `oprd` command: LightningCLI over DistillModule and PromptDataModule (fit / validate / test / predict), plus
`oprd export` (the student as a Hugging Face folder, see `oprd/export.py`)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from oprd.checkpoint import ResumableCheckpoint
from oprd.data import PromptDataModule, check_sources
from oprd.export import DESCRIPTION as EXPORT_DESCRIPTION
from oprd.export import export_main, export_parser
from oprd.module import DistillModule


class OprdCLI(LightningCLI):
    """LightningCLI with oprd's defaults; every `__init__` argument is a flag and a YAML key.

    Checkpointing is always on (issue 6): `--checkpoint.*` / a `checkpoint:` section configure `ResumableCheckpoint`,
    and checkpoints are written atomically by the default `trainer.plugins` entry.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.log_every_n_steps": 1,
                "trainer.plugins": [{"class_path": "oprd.checkpoint.AtomicCheckpointIO"}],
            }
        )
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        # Bad prompt files fail here, in a second, not after the teacher has loaded (issue 6).
        data = self.config[self.subcommand].get("data") if self.subcommand else None
        if data is not None:
            train = data.train if self.subcommand == "fit" else None
            check_sources(train, data.val, seed=data.seed, num_val=data.num_val)

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `export` is dispatched by `main` (it needs no trainer); listing it here shows it in `oprd --help`.
        subcommands = getattr(parser, "_subcommands_action", None)
        if subcommands is not None:
            subcommands.add_subcommand("export", export_parser(), help=EXPORT_DESCRIPTION)


def _show_progress_logs() -> None:
    # oprd says what it does (building a built-in model takes minutes on a CPU); Lightning configures only its own.
    logger = logging.getLogger("oprd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("oprd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None) -> None:
    # Tokenizers' thread pool forks badly under DataLoader workers and prints a warning per process.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _show_progress_logs()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        export_main(argv[1:])
        return
    try:
        OprdCLI(
            DistillModule,
            PromptDataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except SIGTERMException:
        # The checkpoint is saved; exit as a terminated process does, so schedulers do not mistake it for success.
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
