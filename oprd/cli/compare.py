"""`oprd compare`: compare objectives on one pair, each at its best learning rate (see `oprd.compare`)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

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


def compare_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="oprd compare", description=DESCRIPTION, epilog=f"Example: {EXAMPLE}")
    parser.add_argument("--config", nargs="+", required=True, help="The fit config(s): pair, data, trainer.")
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=["oprd", "opd"],
        help="Objective fragments: shipped names (oprd, opd, opd_topk, mix) or YAML files.",
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        default=[],
        help="Learning rates for every objective (1e-5 3e-5), or per objective (opd=3e-6,1e-5).",
    )
    parser.add_argument("--steps", type=int | None, default=None, help="Optimizer steps (default: the config's).")
    parser.add_argument("--eval_every", type=int | None, default=None, help="Steps between held-out scores.")
    parser.add_argument(
        "--budget",
        type=Literal["steps", "time"],
        default="steps",
        help="Equal steps, or equal training seconds (--time_s; the schedule is then constant).",
    )
    parser.add_argument("--time_s", type=float | None, default=None, help="Training seconds per run (--budget time).")
    parser.add_argument("--eval_prompts", type=int, default=64, help="Held-out prompts (half select, half report).")
    parser.add_argument(
        "--select",
        type=Literal["reverse_kl", "accuracy"],
        default="reverse_kl",
        help="The metric that picks each objective's learning rate, on the selection half.",
    )
    parser.add_argument(
        "--final_heldout",
        nargs="+",
        default=[],
        help="Other prompt sources scored on the final weights (e.g. arithmetic-rephrased arithmetic-large).",
    )
    parser.add_argument("--out", type=str, default="runs/compare", help="Results folder.")
    return parser  # fmt: skip


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
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = compare_parser().parse_args(own)
    settings = CompareSettings(
        configs=args.config,
        objectives=args.objectives,
        lrs=parse_lrs(args.lr),
        steps=args.steps,
        eval_every=args.eval_every,
        budget=args.budget,
        time_s=args.time_s,
        eval_prompts=args.eval_prompts,
        select=args.select,
        final_heldout=args.final_heldout,
        out=Path(args.out),
        extra=extra,
    )
    result = compare(settings, CliFits())
    result["meta"] = {"command": "oprd compare " + " ".join(argv)}
    print_table(result)
    json_path = write_json(result, settings.out / "compare.json")
    png = plot(result, settings.out / "compare.png")
    print(f"wrote {json_path} and {png}")
    return result
