"""The import rules docs/architecture.md states, enforced on the source: layers, the torch-free store, no circles.

Every ``import`` and ``from ... import`` is read with ``ast``, at any depth (a lazy import inside a
function counts the same as one at the top, and so does one under ``TYPE_CHECKING``): the rules are
about which code may know of which, not about when it is loaded.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapterkit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adapterkit"

#: From the bottom up. A module may import modules of its own layer or of the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version"),
    ("params", "schema", "hookspecs", "files"),
    ("adapter", "base_identity", "devices", "weighting"),
    ("store", "base_model"),
    ("strategies", "formats", "remotes", "default_plugins"),
    ("plugins",),
    ("registry", "composition", "merging", "analysis", "sync", "extraction", "checking"),
    ("__init__",),
    ("cli", "demo", "__main__"),
]
#: What the store may import: nothing that knows tensors, PEFT or any adapter format.
STORE_MAY_IMPORT = ("adapterkit.store", "adapterkit.errors", "adapterkit.files", "adapterkit.schema")
FORBIDDEN_IN_STORE = ("torch", "peft", "transformers", "safetensors", "numpy")
#: Modules a strategy (pure tensor maths) must never touch: files, the network, stores, plugins.
IO_MODULES = ("os", "io", "pathlib", "shutil", "tempfile", "socket", "fsspec", "safetensors", "urllib")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement in ``path``."""
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names], node.lineno


def targets(module: str, names: list[str]) -> set[str]:
    """The package modules an import reaches: ``from a.b import c`` is ``a.b.c`` when that is a module."""
    reached = {f"{module}.{name}" for name in names if f"{module}.{name}" in MODULES}
    if module in MODULES and (not names or len(reached) < len(names)):
        reached.add(module)
    return reached


def layer(module: str) -> int:
    parts = module.split(".")
    key = "__init__" if module == "adapterkit" else parts[1]
    for index, members in enumerate(LAYERS):
        if key in members:
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md")


def graph() -> dict[str, set[str]]:
    return {
        name: {t for module, names, _ in imports(path) for t in targets(module, names) if t != name}
        for name, path in MODULES.items()
    }


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer(name)


def test_imports_never_run_up_the_layers() -> None:
    upward = [
        f"{MODULES[name].relative_to(ROOT)} imports {target}"
        for name, reached in graph().items()
        for target in sorted(reached)
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_circles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_store_imports_no_torch_peft_or_formats() -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("adapterkit.store"):
            continue
        for module, _, line in imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN_IN_STORE or (top == "adapterkit" and not module.startswith(STORE_MAY_IMPORT)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_strategies_do_no_io_and_know_no_plugins() -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("adapterkit.strategies"):
            continue
        for module, _, line in imports(path):
            top = module.split(".")[0]
            inside = top == "adapterkit" and not module.startswith(("adapterkit.strategies", "adapterkit.params"))
            if top in IO_MODULES or inside:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def public_only(path: Path, own: tuple[str, ...] = ()) -> list[str]:
    """Imports of adapterkit in ``path`` that go past the public API (``adapterkit`` and its ``__all__``)."""
    bad = []
    for module, names, line in imports(path):
        if module.split(".")[0] in own or module.split(".")[0] != "adapterkit":
            continue
        private = [n for n in names if n not in adapterkit.__all__]
        if module != "adapterkit" or private:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} {private or ''}".rstrip())
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_use_the_public_api_alone(path: Path) -> None:
    assert not public_only(path, own=(path.relative_to(ROOT / "plugins").parts[0],))


@pytest.mark.parametrize("name", ["adapterkit.cli", "adapterkit.demo"])
def test_the_cli_and_the_demo_use_the_public_api_alone(name: str) -> None:
    bad = [line for line in public_only(MODULES[name]) if "adapterkit.demo" not in line]  # cli runs the demo
    assert not bad, "\n".join(bad)


def test_built_in_remotes_and_formats_import_only_public_names_of_the_layers_below() -> None:
    """A built-in is a plugin shipped in the package: what it takes from the store and the API is public."""
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(("adapterkit.remotes", "adapterkit.formats")):
            continue
        own = name.split(".")[:2]
        for module, names, line in imports(path):
            if not module.startswith(("adapterkit.store", "adapterkit.registry", "adapterkit.plugins")):
                continue
            if module.split(".")[:2] == own:
                continue
            private = [n for n in names if n not in adapterkit.__all__ and not n.isupper()]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} takes {private} from {module}")
    assert not bad, "\n".join(bad)


def test_registry_commands_do_not_import_torch() -> None:
    """``adapterkit list`` must start fast: importing the CLI loads neither torch nor transformers."""
    import subprocess

    code = "import sys, adapterkit.cli; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
