"""The `oprd` command: LightningCLI over DistillModule and PromptDataModule (fit / validate / test / predict), plus
`oprd export` (the student as a Hugging Face folder, see `oprd.export`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from oprd.cli import arguments, errors, preflight
from oprd.cli.compare import compare_main
from oprd.cli.links import calibrate_on_training_prompts
from oprd.data import PromptDataModule
from oprd.evaluation.predictions import output_path
from oprd.export import DESCRIPTION as EXPORT_DESCRIPTION
from oprd.export import export_main
from oprd.module import DistillModule
from oprd.parallel.sharding import register_strategies
from oprd.training.checkpoint import ResumableCheckpoint

log = logging.getLogger("oprd")
EPILOG = (
    f"Also: `oprd export --help`: {EXPORT_DESCRIPTION} `oprd compare --help`: compare objectives (hidden-state vs "
    "logit distillation) on one pair, each at its best learning rate."
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


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
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            # LightningCLI next writes a checkpoint's saved settings over these; keep what this run was given.
            self.given_model = self.config[subcommand].model.clone()
            preflight.check_ckpt_path(self.config[subcommand].get("ckpt_path"))

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
        preflight.check_config(subcommand, config)
        calibrate_on_training_prompts(config)
        root = config.trainer.default_root_dir or os.getcwd()
        # One folder for every run's checkpoints, so `--ckpt_path last` finds the previous run's `last.ckpt`
        # (Lightning's default is the logger's version folder, which changes on every run).
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if self.subcommand == "predict":
            writer = {"path": str(output_path(root, config.data.train, config.data.val))}
            callback = Namespace(class_path="oprd.evaluation.predictions.JSONLWriter", init_args=Namespace(writer))
            config.trainer.callbacks = [*(config.trainer.callbacks or []), callback]

    def before_fit(self) -> None:
        # Everything is checked and built: a fresh run takes `last.ckpt` over from an earlier one in the same folder.
        if self.config.fit.get("ckpt_path") is None:
            kept = preflight.keep_earlier_run(self.config.fit.checkpoint.dirpath)
            if kept is not None:
                log.warning("An earlier run's last.ckpt is kept as %s; this run writes last.ckpt.", kept)


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


def build_cli(args: list[str] | None, parser_kwargs: dict | None = None) -> OprdCLI:
    """The `oprd` LightningCLI. With `parser_kwargs` it has the subcommands and runs one; without, it parses `fit`'s
    arguments and builds the model, data and Trainer for the caller to run (`cli.trainer.fit(cli.model, ...)`)."""
    register_strategies()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # every config field's docstring in --help
    return OprdCLI(
        DistillModule,
        PromptDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **(parser_kwargs or {})},
        args=args,
        run=parser_kwargs is not None,
    )


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
        arguments.check_config_files(argv)
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
