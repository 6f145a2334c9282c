"""The command line before the parser reads it: negative numbers in exponent form, and config files that the YAML
parser would take silently or report without a file and line.

argparse takes `-1e-3` after a flag for another flag (it knows only `-1` and `-1.5` as negative numbers), and
jsonargparse keeps the last of two `model:` sections in one file without a word, reports an empty file as
"Unexpected config:" and a syntax error without the file's name. A setting of the flat layout before the model's
settings were grouped is named with its new key.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path

import yaml

from oprd.hparams import MOVED, moved_message

NEGATIVE_NUMBER = re.compile(r"^-\.?(\d|inf$|nan$)", re.IGNORECASE)
"""A value that starts like a negative number (`-1e-3`, `-.5`, `-inf`), not like an option."""


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`, so the number reaches the flag (and its range check) instead of argparse's
    "expected one argument"."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML's own loaders keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # a complex key: SafeLoader refuses it itself
            if key in seen:
                first = seen[key] + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice at this level (first on line {first})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def config_files(argv: list[str]) -> list[str]:
    """The files named by `--config PATH` or `--config=PATH` (values that are not files are YAML text or typos,
    which the parser reports itself)."""
    files = []
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif token.startswith("--config="):
            files.append(token.removeprefix("--config="))
    return [file for file in files if Path(file).is_file()]


def check_config_files(argv: list[str]) -> None:
    """Every `--config` file is readable YAML, a mapping of settings, with no key given twice and no model setting of
    the flat layout before the settings were grouped (`model: {hidden_weight: 1}`); and no such flag either.

    Raises:
        ValueError: naming the file (and the line, where there is one) and the fix.
    """
    for file in config_files(argv):
        check_config_file(Path(file))
    check_moved_flags(argv)


def check_config_file(path: Path) -> None:
    """See `check_config_files`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path} is not a text file: give a YAML file such as configs/tiny.yaml.") from err
    try:
        settings = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = err.problem or err.context or "not valid YAML"
        fix = "merge the two into one" if "given twice" in problem else "fix the YAML there"
        raise ValueError(f"--config {where}: {problem}; {fix} (a config maps sections to settings).") from err
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path} is not valid YAML ({err}).") from err
    if settings is None:
        raise ValueError(
            f"--config {path} is empty: write settings by section, e.g. `trainer: {{max_steps: 30}}` (see "
            "configs/tiny.yaml), or drop --config."
        )
    if not isinstance(settings, dict):
        shown = repr(settings) if len(repr(settings)) <= 40 else repr(settings)[:37] + "..."
        raise ValueError(
            f"--config {path} holds a {type(settings).__name__} ({shown}), not settings: a config maps sections to "
            "settings, e.g. `trainer: {max_steps: 30}` (see configs/tiny.yaml)."
        )
    model = settings.get("model")
    moved = [key for key in model if key in MOVED] if isinstance(model, dict) else []
    if moved:
        raise ValueError(moved_message(moved[0], f"--config {path}: "))


def check_moved_flags(argv: list[str]) -> None:
    """No `--model.*` flag of the flat layout before the settings were grouped (`--model.hidden_weight`).

    Raises:
        ValueError: naming the flag's new key.
    """
    for token in argv:
        key = token.removeprefix("--model.").partition("=")[0]
        if token.startswith("--model.") and key.partition(".")[0] in MOVED:
            raise ValueError(moved_message(key, flag=True))
