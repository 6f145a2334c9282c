"""Model aliases: short names (`smollm2-135m-instruct`) that resolve to local folders, built on first use by the
package that provides them.

Providers register through the `oprd.aliases` entry-point group: each entry point is a function returning
`{name: Alias}`. oprd's own demo models are registered that way too (`oprd.demo.builtin:aliases`, in
pyproject.toml), so `models/` imports no provider and another package can add its own models the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

GROUP = "oprd.aliases"


@dataclass(frozen=True)
class Alias:
    """A registered model name."""

    description: str
    resolve: Callable[[str], Path]
    """`resolve(name)` returns the local folder of the model, building it first if needed."""


@functools.cache
def aliases() -> dict[str, Alias]:
    """Every registered alias, by name (the entry points are read once per process)."""
    found: dict[str, Alias] = {}
    for point in entry_points(group=GROUP):
        found.update(point.load()())
    return found
