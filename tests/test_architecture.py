"""The import plan the README draws is the one the code follows: every import of `oprd/` goes to a lower layer of
the README's list, and no module imports itself back through others."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "oprd"


def readme_layers() -> list[list[str]]:
    """The README's layers, top to bottom: the indented lines after "Layers, top to bottom"."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Layers, top to bottom") :].split("\n\n")[1]
    return [re.findall(r"[a-z_]+", line) for line in block.splitlines() if line.strip()]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the oprd modules it imports anywhere in its file (inside functions too); `from oprd.x import y`
    counts as importing `oprd.x.y` when that is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "oprd":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "oprd"}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def unit(module: str) -> str:
    """The layer unit a module belongs to: its sub-package (`oprd.models.spec` -> `models`) or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "oprd"


def test_every_unit_of_the_package_is_in_exactly_one_readme_layer():
    layers = readme_layers()
    listed = [name for layer in layers for name in layer]
    units = {unit(m) for m in imports()} - {"oprd"}
    assert sorted(listed) == sorted(units), "README's layer list and oprd/'s packages differ"


def test_every_import_goes_down_the_readme_layers():
    rank = {name: i for i, layer in enumerate(readme_layers()) for name in layer}
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if unit(module) != "oprd" and unit(target) != unit(module) and rank[unit(target)] <= rank[unit(module)]
    )
    assert not upward, "imports that do not go to a lower layer:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    graph = imports()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
