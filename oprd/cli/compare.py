"""`oprd compare`: compare objectives on one pair, each at its best learning rate (see `oprd.compare`)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import MISSING, fields
from typing import get_args, get_origin, get_type_hints

from docstring_parser import parse_from_object
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from oprd.cli import preflight
from oprd.cli.fit import OprdCLI, build_cli, quiet_startup, show_progress_logs
from oprd.compare.report import plot, print_table, write_json
from oprd.compare.runner import CompareSettings, compare

DESCRIPTION = (
    "Train the same student with several objectives (hidden-state OPRD, logit OPD, mixes: config fragments or any "
    "YAML), each over a learning-rate grid, from the same weights, prompts and seeds; choose each objective's rate on "
    "half of the held-out prompts and report it on the other half. Writes compare.json and compare.png to --out and "
    "one W&B run per objective and rate, in one group. Flags after `--` go to every run's `oprd fit`."
)
EXAMPLE = "oprd compare --config my.yaml --objectives oprd opd --lr 1e-5 3e-5 1e-4 --steps 50 --eval_every 10"


def parse_fit(args: list[str]) -> Namespace:
    """The settings one run's `fit` would get from `args`, parsed and checked like `fit` checks them (config files,
    keys, types, prompt sources), without loading a model or writing a file."""

    class ParseOnly(OprdCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():  # sys.argv holds `oprd compare`'s command line; this run's is `args`, as meant
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        config = build_cli(args, cli_class=ParseOnly).config
    preflight.check_config("fit", config)  # creates nothing: --out stays untouched until every check has passed
    return config


class CliFits:
    """The `fit` CLI as `oprd compare` builds its runs (`oprd.compare.runner.Fits`)."""

    def parse(self, args: list[str]) -> Namespace:
        return parse_fit(args)

    def build(self, args: list[str]) -> OprdCLI:
        return build_cli(args)

    def prepare_process(self) -> None:
        show_progress_logs()
        quiet_startup()
        del sys.argv[1:]  # the run's arguments come from `fit_args`, not from the `oprd compare` command line


NOT_FLAGS = {"group", "extra"}
"""`CompareSettings` fields that are no flag: the W&B group is named when a comparison starts, and `extra` holds the
flags after `--`."""
FLAGS = {"configs": "config", "lrs": "lr"}
"""Fields whose flag is named after one item: `--config a.yaml b.yaml`, `--lr 1e-5 opd=3e-6`."""


def compare_parser() -> ArgumentParser:
    """One flag per `CompareSettings` field but `NOT_FLAGS`, in field order, with the field's docstring as its help, so
    a new field is a new flag. jsonargparse adds each from the field's type, except lists and dicts: those take their
    items one after another (`--objectives oprd opd`, not jsonargparse's `[oprd,opd]`), and a dict's are the strings
    `parse_lrs` reads."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="oprd compare", description=DESCRIPTION, epilog=f"Example: {EXAMPLE}")
    docs = {param.arg_name: param.description for param in parse_from_object(CompareSettings).params}
    types = get_type_hints(CompareSettings)
    names = {f.name for f in fields(CompareSettings)}
    for f in fields(CompareSettings):
        if f.name in NOT_FLAGS:
            continue
        kind = get_origin(types[f.name])
        if kind not in (list, dict):
            parser.add_class_arguments(CompareSettings, as_group=False, skip=names - {f.name})  # keeps field order
            continue
        required = f.default_factory is MISSING
        parser.add_argument(
            f"--{FLAGS.get(f.name, f.name)}",
            nargs="+",
            type=get_args(types[f.name])[0] if kind is list else str,
            required=required,
            default=None if required else [] if kind is dict else f.default_factory(),
            help=docs[f.name],
        )
    return parser


def compare_settings(argv: list[str]) -> CompareSettings:
    """The `CompareSettings` of `oprd compare`'s arguments (without the subcommand name): flags after `--` go to every
    run's `fit`. Bad values are refused by the parser (usage and error) or by `CompareSettings` (a `ValueError`)."""
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    field = {flag: name for name, flag in FLAGS.items()}  # parsed under the flag's name, as its errors name it
    values = {field.get(key, key): value for key, value in compare_parser().parse_args(own).as_dict().items()}
    return CompareSettings(**{**values, "lrs": parse_lrs(values["lrs"])}, extra=extra)


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    """`["1e-5", "3e-5", "opd=3e-6,1e-5"]` -> `{"*": [1e-5, 3e-5], "opd": [3e-6, 1e-5]}`."""
    lrs: dict[str, list[float]] = {}
    for item in items:
        name, _, values = item.rpartition("=") if "=" in item else ("*", "", item)
        try:
            lrs.setdefault(name, []).extend(float(v) for v in values.split(",") if v)
        except ValueError as err:
            raise ValueError(f"--lr {item!r}: expected numbers (1e-5) or objective=numbers (opd=3e-6,1e-5).") from err
    return lrs


def compare_main(argv: list[str]) -> dict:
    """Run `oprd compare` with its arguments (without the subcommand name)."""
    settings = compare_settings(argv)
    result = compare(settings, CliFits())
    result["meta"] = {"command": "oprd compare " + " ".join(argv)}
    print_table(result)
    json_path = write_json(result, settings.out / "compare.json")
    png = plot(result, settings.out / "compare.png")
    print(f"wrote {json_path} and {png}")
    return result
