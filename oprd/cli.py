"""The `oprd` command: LightningCLI over DistillModule and PromptDataModule (fit / validate / test / predict), plus
`oprd export` (the student as a Hugging Face folder, see `oprd.export`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from oprd.data import PromptDataModule, check_sources
from oprd.export import DESCRIPTION as EXPORT_DESCRIPTION
from oprd.export import export_main
from oprd.module import DistillModule
from oprd.parallel.sharding import register_strategies
from oprd.training.checkpoint import ResumableCheckpoint

EPILOG = f"Also: `oprd export --help`: {EXPORT_DESCRIPTION}"


class OprdCLI(LightningCLI):
    """LightningCLI with oprd's defaults; every `__init__` argument is a flag and a YAML key.

    Checkpointing is always on: `--checkpoint.*` / a `checkpoint:` section configure `ResumableCheckpoint` (by default
    in `<trainer.default_root_dir>/checkpoints`), and checkpoints are written atomically by the default
    `trainer.plugins` entry.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.log_every_n_steps": 1,
                "trainer.plugins": [{"class_path": "oprd.training.checkpoint.AtomicCheckpointIO"}],
            }
        )
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # One folder for every run's checkpoints, so `--ckpt_path last` finds the previous run's `last.ckpt`
        # (Lightning's default is the logger's version folder, which changes on every run).
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        # Bad prompt files fail here, in a second, not after the teacher has loaded.
        data = config.get("data")
        if data is not None:
            train = data.train if self.subcommand == "fit" else None
            check_sources(train, data.val, seed=data.seed, num_val=data.num_val)


def _show_progress_logs() -> None:
    # oprd says what it does (building a built-in model takes minutes on a CPU); Lightning configures only its own.
    logger = logging.getLogger("oprd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("oprd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _quiet_startup() -> None:
    """Drop what every run would otherwise print that is not about the run: Lightning's advertisement for its cloud
    logger, and a deprecation warning raised inside Lightning's own code (nothing a user can act on)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(args: list[str] | None = None) -> None:
    # Tokenizers' thread pool forks badly under DataLoader workers and prints a warning per process.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _show_progress_logs()
    _quiet_startup()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        export_main(argv[1:])
        return
    register_strategies()
    try:
        OprdCLI(
            DistillModule,
            PromptDataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": EPILOG},
            args=args,
        )
    except SIGTERMException:
        # The checkpoint is saved; exit as a terminated process does, so schedulers do not mistake it for success.
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
