"""The LightningCLI that builds an `oprd` run (fit / validate / test / predict) from configs and flags: oprd's
defaults, always-on checkpointing, every check before any model loads. `oprd compare` builds each of its runs with
it too."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from oprd.cli import arguments, preflight, resume
from oprd.cli.links import calibrate_on_training_prompts
from oprd.data import PromptDataModule
from oprd.evaluation.predictions import output_path
from oprd.module import DistillModule
from oprd.parallel.sharding import register_strategies
from oprd.training.checkpoint import ResumableCheckpoint, load_checkpoint

log = logging.getLogger("oprd")


class OprdCLI(LightningCLI):
    """LightningCLI with oprd's defaults; every `__init__` argument is a flag and a YAML key.

    Checkpointing is always on: `--checkpoint.*` / a `checkpoint:` section configure `ResumableCheckpoint` (by default
    in `<trainer.default_root_dir>/checkpoints`), and checkpoints are written atomically by the default
    `trainer.plugins` entry. Every setting is checked before any model loads (`oprd.cli.preflight`).
    """

    def add_core_arguments_to_parser(self, parser) -> None:
        # oprd's own options (model, data) first in `--help`, Lightning's Trainer after them.
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.log_every_n_steps": 1,
                "trainer.plugins": [{"class_path": "oprd.training.checkpoint.AtomicCheckpointIO"}],
            }
        )
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, list):  # `oprd compare`'s runs give theirs; the command line otherwise
            arguments.check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            # LightningCLI next writes a checkpoint's saved settings over these; keep what this run was given.
            self.given_model = self.config[subcommand].model.clone()
            # `last` becomes the file it names before Lightning reads it, so it is checked as a path is.
            config = self.config[subcommand]
            config.ckpt_path = resume.resolve_ckpt_path(subcommand, config)
            preflight.check_ckpt_path(config.ckpt_path)

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand or "fit"  # no subcommand: built to be run by the caller (`oprd compare`)
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and os.path.isfile(ckpt_path):
            saved = config.model  # what LightningCLI made of the checkpoint's hyper-parameters
            taken = preflight.taken_from_checkpoint(self.given_model.as_dict(), saved.as_dict(), ckpt_path)
            config.model = self.given_model
            for key in taken:
                config.model[key] = saved[key]
            if subcommand == "fit":
                resume.check_resumed_data(load_checkpoint(ckpt_path), config.data.as_dict(), ckpt_path)
        preflight.check_config(subcommand, config)
        calibrate_on_training_prompts(config)
        if self.subcommand == "fit":  # not `oprd compare`'s runs, which save no checkpoint on purpose
            resume.check_fit_settings(config)
        root = config.trainer.default_root_dir or os.getcwd()
        # One folder for every run's checkpoints, so `--ckpt_path last` finds the previous run's `last.ckpt`
        # (Lightning's default is the logger's version folder, which changes on every run).
        config.checkpoint.dirpath = resume.checkpoint_dir(config)
        if self.subcommand == "predict":
            writer = {"path": str(output_path(root, config.data.train, config.data.val))}
            callback = Namespace(class_path="oprd.evaluation.predictions.JSONLWriter", init_args=Namespace(writer))
            config.trainer.callbacks = [*(config.trainer.callbacks or []), callback]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a handler keeps the stream it was made with otherwise)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_progress_logs() -> None:
    # oprd says what it does (building a built-in model takes minutes on a CPU); Lightning configures only its own.
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("oprd: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def quiet_startup() -> None:
    """Drop what every run would otherwise print that is not about the run: Lightning's advertisement for its cloud
    logger, and a deprecation warning raised inside Lightning's own code (nothing a user can act on)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def build_cli(args: list[str] | None, parser_kwargs: dict | None = None, cli_class: type[OprdCLI] = OprdCLI) -> OprdCLI:
    """The `oprd` LightningCLI. With `parser_kwargs` it has the subcommands and runs one; without, it parses `fit`'s
    arguments and builds the model, data and Trainer for the caller to run (`cli.trainer.fit(cli.model, ...)`).
    `cli_class` may build less (`oprd compare` parses every run's settings before the first run)."""
    register_strategies()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # every config field's docstring in --help
    return cli_class(
        DistillModule,
        PromptDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **(parser_kwargs or {})},
        args=args,
        run=parser_kwargs is not None,
    )
