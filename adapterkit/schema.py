"""The JSON Schemas in ``schemas/`` and one readable message per violation.

The schemas are the single source of truth for stored documents: they ship inside the wheel
(``adapterkit/_schemas``) and, in a source checkout, are read from ``schemas/`` at the top.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from adapterkit.errors import SchemaValidationError

__all__ = ["ADAPTER_SCHEMA", "MANIFEST_SCHEMA", "load_schema", "schemas_digest", "validate"]

ADAPTER_SCHEMA = "adapter.schema.json"
MANIFEST_SCHEMA = "manifest.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``name`` (e.g. ``adapter.schema.json``)."""
    packaged = resources.files("adapterkit").joinpath("_schemas", name)
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8"))
    return json.loads((Path(__file__).resolve().parent.parent / "schemas" / name).read_text(encoding="utf-8"))


@functools.cache
def schemas_digest() -> str:
    """sha256 over both schemas (canonical JSON): it changes whenever what counts as valid changes."""
    import hashlib

    hasher = hashlib.sha256()
    for name in (ADAPTER_SCHEMA, MANIFEST_SCHEMA):
        hasher.update(json.dumps(load_schema(name), sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


@functools.cache
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate(document: Any, name: str, source: str) -> None:
    """Raise :class:`SchemaValidationError` naming ``source`` and the field when ``document`` fails."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(name).iter_errors(document))
    if error is None:
        return
    error = _inside_the_matching_branch(error)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    where = f"field '{field}'" if field else "top level"
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    raise SchemaValidationError(f"{source}: {where}: {message}", source=source, field=field)


def _inside_the_matching_branch(error: Any) -> Any:
    """For ``oneOf``/``anyOf`` ("null or an object"), the error inside the one branch the value fits by type.

    Without this, ``lineage: {"strategy": "linear"}`` reports "is not valid under any of the given schemas";
    with it, "'parameters' is a required property", which says what to fix.
    """
    from jsonschema.exceptions import best_match

    while error.validator in ("oneOf", "anyOf") and error.context:
        branches: dict[Any, list[Any]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        fitting = [
            errors
            for errors in branches.values()
            if not any(sub.validator == "type" and not sub.relative_path for sub in errors)
        ]
        if len(fitting) != 1:
            break
        error = best_match(fitting[0])
    return error
