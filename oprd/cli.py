"""The `oprd` command: LightningCLI over DistillModule and PromptDataModule (fit / validate / test / predict)."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from oprd.data import PromptDataModule
from oprd.module import DistillModule


class OprdCLI(LightningCLI):
    """LightningCLI with oprd's defaults; every `__init__` argument is a flag and a YAML key."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.log_every_n_steps": 1})


def main(args: list[str] | None = None) -> None:
    # Tokenizers' thread pool forks badly under DataLoader workers and prints a warning per process.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OprdCLI(
        DistillModule,
        PromptDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
