"""Every error message adapterkit raises is explained on the troubleshooting page, docs/errors.md.

The test reads the source with ``ast``: each ``SomeError(...)`` where ``SomeError`` is an
:class:`~adapterkit.errors.AdapterkitError` subclass (raised directly, or built in a helper and
raised later) is a *site*. Its message is split into the literal text the user will see and the
variable parts (paths, refs, digests...); module-level string constants and a local variable
assigned once in the same function are filled in.

The message must be quoted in a code span of the page (`` `...` ``, or ``` `` ... `` ``` when it
holds backticks), with anything standing for the variable parts (``PATH``, ``'NAME'``):

* when the message has a literal fragment of at least ``MIN_KEY`` characters that no message of
  other wording shares, that fragment (its *key*) must appear in a code span, so one row may
  document several near-identical messages;
* otherwise (``no ref NAME:TAG``) a code span must match the whole message, each variable part
  standing for at least one character.

Backticks, ``\\|`` and runs of whitespace are ignored on both sides.

A site that only re-raises another error's text (``raise SyncError(str(exc))`` in an ``except``)
has nothing of its own to document; the raise it wraps is a site itself. Strategies report bad
parameters with plain ``ValueError``, which composition re-raises as ``CompositionError``: those
messages are sites too (``WRAPPED_VALUE_ERRORS``).
"""

from __future__ import annotations

import ast
import inspect
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import adapterkit.errors

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("adapterkit", "plugins")
PAGE = ROOT / "docs" / "errors.md"

#: A literal fragment this long is distinctive enough to stand alone as the key.
MIN_KEY = 12

#: Modules whose ``raise ValueError(...)`` reaches the user as an AdapterkitError with the same text.
WRAPPED_VALUE_ERRORS = {
    # Strategy.check_params and the strategy functions: composition.resolve_strategy re-raises the
    # message as CompositionError; compose / plan_compose as "strategy 'x' failed on module 'm': ...".
    "adapterkit/strategies/": "CompositionError",
    # params.check_params: declared parameters of strategies and formats, re-raised as AdapterkitErrors.
    "adapterkit/params.py": "CompositionError",
}

#: Messages with no literal text of their own to search for: (file, function) -> what the page shows.
NO_STATIC_TEXT = {
    # f"{source}: {where}: {message}": where is "field 'F'" or "top level", message is jsonschema's.
    ("adapterkit/schema.py", "validate"): "SOURCE: field 'FIELD': PROBLEM",
}

#: Internal invariants a user cannot meet, exempt from the page: (file, key) -> why.
#: Keep this list small; when in doubt, document the message.
EXEMPT: dict[tuple[str, str], str] = {
    # serialize() is fed only by tensors_to_bytes, which takes each tensor's bytes from the tensor
    # itself, so they always fit its dtype and shape; no input of a user's reaches this check.
    ("adapterkit/files/safetensors.py", "bytes do not fit"): "internal consistency check of serialize()",
}


@dataclass
class Site:
    path: str  #: relative to the repository root, with "/"
    line: int
    function: str
    error: str  #: the class raised
    parts: list[str | None]  #: literal text, None for each variable part
    passthrough: bool = False  #: only re-raises another error's message
    fragments: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def template(self) -> str:
        return "".join("…" if p is None else p for p in self.parts)


def _norm(text: str) -> str:
    return " ".join(text.replace("`", "").replace("\\|", "|").split())


def _error_classes(trees: dict[str, ast.Module]) -> set[str]:
    """Names of AdapterkitError subclasses: those in adapterkit.errors and any defined in the sources."""
    names = {
        name
        for name, obj in vars(adapterkit.errors).items()
        if inspect.isclass(obj) and issubclass(obj, adapterkit.errors.AdapterkitError)
    }
    grown = True
    while grown:
        grown = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ClassDef)
                    and node.name not in names
                    and any(_name_of(base) in names for base in node.bases)
                ):
                    names.add(node.name)
                    grown = True
            for node in ast.walk(tree):  # from adapterkit.errors import X as Y
                if isinstance(node, ast.ImportFrom):
                    for alias in node.names:
                        if alias.asname and alias.name in names and alias.asname not in names:
                            names.add(alias.asname)
                            grown = True
    return names


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # errors.StoreError
        return node.attr
    return None


def _string_constants(trees: dict[str, ast.Module]) -> dict[str, str]:
    """Module-level ``NAME = "text"`` across the sources (names given different values are dropped)."""
    seen: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value
            else:
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                for target in targets:
                    if isinstance(target, ast.Name):
                        seen.setdefault(target.id, set()).add(value.value)
    return {name: values.pop() for name, values in seen.items() if len(values) == 1}


class _Collector(ast.NodeVisitor):
    def __init__(self, path: str, errors: set[str], constants: dict[str, str], value_errors: bool) -> None:
        self.path = path
        self.errors = errors
        self.constants = constants
        self.value_errors = value_errors
        self.functions: list[ast.AST] = []
        self.handlers: list[str] = []  # names bound by enclosing `except ... as NAME`
        self.sites: list[Site] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self.handlers.append(node.name or "")
        self.generic_visit(node)
        self.handlers.pop()

    def visit_Raise(self, node: ast.Raise) -> None:
        if self.value_errors and isinstance(node.exc, ast.Call) and _name_of(node.exc.func) == "ValueError":
            self._site(node.exc, "ValueError")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if _name_of(func) in self.errors:
            self._site(node, _name_of(func) or "")
        elif (  # raise type(exc)(f"{where}: {exc}"): the caught error again, with a prefix
            isinstance(func, ast.Call)
            and _name_of(func.func) == "type"
            and func.args
            and isinstance(func.args[0], ast.Name)
            and func.args[0].id in self.handlers
        ):
            self.sites.append(self._new(node, "type(...)", [None], passthrough=True))
        self.generic_visit(node)

    def _new(self, node: ast.AST, error: str, parts: list[str | None], passthrough: bool = False) -> Site:
        function = getattr(self.functions[-1], "name", "") if self.functions else "<module>"
        return Site(self.path, node.lineno, function, error, parts, passthrough)

    def _site(self, call: ast.Call, error: str) -> None:
        arg = call.args[0] if call.args else None
        if arg is None:
            self.sites.append(self._new(call, error, []))
            return
        passthrough = (isinstance(arg, ast.Name) and arg.id in self.handlers) or (
            isinstance(arg, ast.Call)
            and _name_of(arg.func) == "str"
            and len(arg.args) == 1
            and isinstance(arg.args[0], ast.Name)
            and arg.args[0].id in self.handlers
        )
        self.sites.append(self._new(call, error, [None] if passthrough else self._parts(arg), passthrough))

    def _local(self, name: str) -> ast.expr | None:
        """The value of ``name`` when the enclosing function assigns it exactly once."""
        if not self.functions:
            return None
        values = [
            node.value
            for node in ast.walk(self.functions[-1])
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ]
        return values[0] if len(values) == 1 else None

    def _parts(self, node: ast.expr, depth: int = 0) -> list[str | None]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.JoinedStr):
            parts: list[str | None] = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(str(value.value))
                elif (
                    isinstance(value, ast.FormattedValue)
                    and isinstance(value.value, ast.Name)
                    and value.value.id in self.constants
                    and value.format_spec is None
                    and value.conversion in (-1, ord("s"), ord("r"))
                ):
                    text = self.constants[value.value.id]
                    parts.append(repr(text) if value.conversion == ord("r") else text)
                else:
                    parts.append(None)
            return parts
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._parts(node.left, depth) + self._parts(node.right, depth)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
            pieces = re.split(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]", str(node.left.value))
            return [p for piece in pieces for p in (piece, None)][:-1]
        if isinstance(node, ast.Name) and node.id in self.constants:
            return [self.constants[node.id]]
        if isinstance(node, ast.Name) and depth < 3:
            value = self._local(node.id)
            if value is not None:
                return self._parts(value, depth + 1)
        return [None]


def _sites() -> list[Site]:
    trees = {}
    for top in SOURCE_DIRS:
        for file in sorted((ROOT / top).rglob("*.py")):
            trees[file.relative_to(ROOT).as_posix()] = ast.parse(file.read_text(encoding="utf-8"), str(file))
    errors = _error_classes(trees)
    constants = _string_constants(trees)
    sites = []
    for path, tree in trees.items():
        value_errors = any(path.startswith(prefix) for prefix in WRAPPED_VALUE_ERRORS)
        collector = _Collector(path, errors, constants, value_errors)
        collector.visit(tree)
        sites += collector.sites
    for site in sites:
        text = "".join("\0" if p is None else p for p in site.parts)
        site.fragments = [f for f in (_norm(chunk) for chunk in text.split("\0")) if re.search(r"[A-Za-z0-9]", f)]
    return sites


SITES = _sites()


def _key(site: Site) -> str:
    """The longest fragment that no message with other wording contains (else the longest fragment)."""
    others = {s.template: s.fragments for s in SITES if s.template != site.template}
    ranked = sorted(site.fragments, key=len, reverse=True)
    for fragment in ranked:
        if not any(fragment in other for fragments in others.values() for other in fragments):
            return fragment
    return ranked[0]


def _pattern(site: Site) -> re.Pattern[str]:
    """The whole message, each variable part matching one or more characters."""
    squash = re.compile(r"\s+")
    return re.compile(
        "".join(".+?" if p is None else re.escape(squash.sub(" ", p.replace("`", ""))) for p in site.parts)
    )


def _documented(site: Site, spans: list[str]) -> bool:
    key = _key(site)
    if len(key) >= MIN_KEY:
        return any(key in span for span in spans)
    pattern = _pattern(site)
    return any(pattern.search(span) for span in spans)


def _spans(text: str) -> list[str]:
    """The code spans of a Markdown text, normalized."""
    return [_norm(m.group(2)) for m in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", text)]


def _check(spans: list[str]) -> Iterator[str]:
    exempt_used = set()
    for site in SITES:
        if site.passthrough:
            continue
        if not site.fragments:
            doc = NO_STATIC_TEXT.get((site.path, site.function))
            if doc is None:
                yield f"{site.where}: {site.error}({site.template!r}) has no literal text: add it to NO_STATIC_TEXT"
            elif not any(_norm(doc) in span for span in spans):
                yield f"{site.where}: {site.error}: `{doc}` (NO_STATIC_TEXT) is not on the page"
            continue
        key = _key(site)
        if (site.path, key) in EXEMPT:
            exempt_used.add((site.path, key))
            continue
        if not _documented(site, spans):
            how = f"key {key!r}" if len(key) >= MIN_KEY else "whole message"
            yield f"{site.where}: {site.error}: {site.template!r} ({how})"
    for entry in sorted(set(EXEMPT) - exempt_used):
        yield f"EXEMPT entry {entry} matches no raise any more: remove it"


def test_the_scan_finds_the_raise_sites() -> None:
    """Guards the scanner itself: if it stops resolving names, the check below would pass vacuously."""
    counts = Counter(site.error for site in SITES)
    assert len(SITES) > 150, counts
    assert {"AdapterFormatError", "StoreError", "SyncError", "PluginError", "ValueError"} <= set(counts), counts
    plugins = next(s for s in SITES if s.path == "adapterkit/plugins.py" and s.error == "PluginError")
    assert plugins.fragments, "a message held in a local variable should be resolved"
    assert any("store.json" in s.template for s in SITES), "module constants should be filled in"


def test_every_error_message_is_on_the_troubleshooting_page() -> None:
    missing = list(_check(_spans(PAGE.read_text(encoding="utf-8"))))
    assert not missing, (
        f"{len(missing)} error messages are not explained in docs/errors.md "
        "(add a row with the message as a code span, what it means and what to do):\n" + "\n".join(missing)
    )


def _example(long_key: bool) -> Site:
    return next(
        s
        for s in SITES
        if s.fragments
        and not s.passthrough
        and (s.path, _key(s)) not in EXEMPT
        and (len(_key(s)) >= MIN_KEY) == long_key
    )


@pytest.mark.parametrize("long_key", [True, False], ids=["key", "whole-message"])
def test_the_check_notices_a_missing_row(long_key: bool) -> None:
    """Deleting the code spans that document a message makes the check name that message."""
    site = _example(long_key)
    spans = _spans(PAGE.read_text(encoding="utf-8"))
    assert _documented(site, spans)
    kept = [span for span in spans if not _documented(site, [span])]
    assert any(entry.startswith(f"{site.where}:") for entry in _check(kept))
