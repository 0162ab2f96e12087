"""Declared parameters: what a strategy takes and what a format's writer takes, checked before any work.

A plugin declares each parameter once (type, default, help, a check); adapterkit fills in defaults,
refuses unknown or ill-typed values with a message naming the owner, and ``adapterkit plugins``
lists them, so strategies and formats behave alike for users and for plugin authors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Param", "check_params", "fraction", "one_of", "positive", "type_name"]


@dataclass(frozen=True)
class Param:
    """One parameter: its type (or tuple of types) and default, shown by ``adapterkit plugins``.

    ``check`` returns what is wrong with a value (None when it is fine), so a bad value is refused
    before any module is touched.
    """

    type: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    check: Callable[[Any], str | None] | None = None

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def fraction(value: float) -> str | None:
    """A fraction in (0, 1]: a density or an energy."""
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def positive(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1, got {value}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"

    return check


def type_name(kind: type | tuple[type, ...]) -> str:
    """``int``, ``float``, ``path``: the name ``adapterkit plugins`` shows for a parameter's type."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = ["path" if k is os.PathLike else k.__name__ for k in kinds]
    return " | ".join(dict.fromkeys(names))


def check_params(owner: str, declared: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """The full parameter set (defaults filled in), or ValueError naming ``owner`` and the bad parameter."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"{owner} takes no parameter {unknown[0]!r} (takes: {', '.join(declared) or 'none'})")
    out = {}
    for key, spec in declared.items():
        value = given.get(key, spec.default)
        if value is not None and not isinstance(value, spec.type):
            if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise ValueError(f"{owner}: parameter {key!r} must be {type_name(spec.type)}, got {value!r}")
        problem = spec.check(value) if spec.check is not None and value is not None else None
        if problem:
            raise ValueError(f"{owner}: parameter {key!r} {problem}")
        out[key] = value
    return out
