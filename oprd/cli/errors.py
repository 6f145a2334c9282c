"""What a user sees when a command fails on their input: the line that matters, a "did you mean", and where the full
traceback is (`--debug`), instead of a usage dump or a 100-line traceback."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
import typing

import lightning as L

USER_ERRORS = (
    ValueError, FileExistsError, FileNotFoundError, ImportError, FloatingPointError, ChildProcessError, ConnectionError,
    argparse.ArgumentError,
)  # fmt: skip
"""Errors that describe bad input, a diverged run or a run the system killed (their messages say what to do); anything
else is a bug and keeps its traceback."""


def known_keys() -> list[str]:
    """Every dotted setting `oprd fit` accepts (`model.optim.lr`, `data.batch_size`, `trainer.max_steps`, ...)."""
    from oprd.data import PromptDataModule
    from oprd.module import DistillModule
    from oprd.training.checkpoint import ResumableCheckpoint

    keys = ["config", "ckpt_path", "seed_everything"]
    for prefix, cls in (
        ("model", DistillModule),
        ("data", PromptDataModule),
        ("trainer", L.Trainer),
        ("checkpoint", ResumableCheckpoint),
    ):
        keys += _keys(prefix, cls.__init__)
    return keys


def _keys(prefix: str, init) -> list[str]:
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # a third-party annotation that does not resolve: names only
        hints = {}
    keys = []
    for name in inspect.signature(init).parameters:
        if name in ("self", "args", "kwargs"):
            continue
        keys.append(f"{prefix}.{name}")
        for option in typing.get_args(hints.get(name)) or (hints.get(name),):
            if dataclasses.is_dataclass(option):
                keys += [f"{prefix}.{name}.{field.name}" for field in dataclasses.fields(option)]
    return keys


def suggestion(message: str) -> str | None:
    """`did you mean --model.objective.hidden_loss.kind?` for the first unknown dotted key a parser message names."""
    names = re.findall(r"(?:--|')([a-z_]+(?:\.[a-z_0-9]+)+)", message)
    keys = known_keys()
    for name in names:
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
            if close:
                return f"did you mean --{close[0]}?"
    return None


def summary(message: str) -> str:
    """The line of a (possibly nested, multi-line) parser or loader error that says what is wrong."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    parsed = _wrong_value(lines)
    if parsed is not None:
        return parsed
    detail = next((line for line in lines[1:] if line.startswith("- Problem with")), None)
    if detail is not None:
        following = lines[lines.index(detail) + 1 : lines.index(detail) + 2]
        return " ".join([lines[0], detail.removeprefix("- "), *following])
    return lines[0]


PARSER_KEY = re.compile(r'^Parser key "([\w.]+)":\s*(.*)$')
EXPECTED = re.compile(r"Expected an? (<class '(\w+)'>|typing\.Literal\[(.*?)\]|[^.]+?)(?:\. Got value: (.*))?$")
GIVEN = re.compile(r"^(?:Got|Given) value: (.*)$")


def _wrong_value(lines: list[str]) -> str | None:
    """`--model.optim.lr expects a float, got 'abc'` for jsonargparse's `Parser key "model.optim.lr":` message, whose
    reason is on the following lines (types per line for a union, the value on the last)."""
    first = PARSER_KEY.match(lines[0])
    if first is None:
        return None
    key, rest = first.groups()
    expected, value = [], None
    for line in [rest, *lines[1:]]:
        line = line.removeprefix("- ")
        found = EXPECTED.search(line)
        if found is not None:
            whole, name, literal, got = found.groups()
            expected.append(_type_name(whole, name, literal))
            value = got if got is not None else value
        given = GIVEN.match(line)
        if given is not None:
            value = given.group(1)
    if not expected:
        return " ".join(lines[:2]) if len(lines) > 1 else lines[0]
    if "a float" in expected and value is not None and value.strip().lower().lstrip("+-.") in ("nan", "inf"):
        return f"--{key} must be a finite number, got {value}."
    shown = f", got {value!r}" if value is not None else ""
    return f"--{key} expects {' or '.join(dict.fromkeys(expected))}{shown}."


def _type_name(whole: str, name: str | None, literal: str | None) -> str:
    if literal is not None:
        return f"one of {literal.replace(chr(39), '')}"
    if name is not None:
        return "null" if name == "NoneType" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return f"a {whole}"


def report(error: BaseException, command: str) -> None:
    """Print `oprd <command>: error: ...`, a suggestion when there is one, and how to see more."""
    message = summary(str(error))
    print(f"oprd {command}: error: {message}".rstrip(), file=sys.stderr)
    hint = suggestion(str(error))
    if hint:
        print(f"  {hint}", file=sys.stderr)
    print(f"  (`oprd {command} --help` lists every option; add --debug for the full traceback)", file=sys.stderr)
