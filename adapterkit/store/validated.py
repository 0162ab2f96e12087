"""Which stored documents are already known to pass their schema.

Schema validation is a pure function of a document's bytes and the schema; every read of a
manifest or metadata blob re-checks its sha256, so a digest that passed once passes again for as
long as the schemas are the same. Remembering those digests (per schema version) keeps
``adapterkit list`` from re-running jsonschema over every module of every adapter on each call,
while a document whose bytes change gets a new digest and is validated afresh.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from adapterkit.schema import schemas_digest

__all__ = ["ValidatedDigests"]

_LINE = re.compile(r"sha256:[0-9a-f]{64}")


class ValidatedDigests:
    """An append-only set of digests, one per line in ``state/validated-<schemas digest>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._known: set[str] | None = None

    @property
    def path(self) -> Path:
        return self.root / "state" / f"validated-{schemas_digest()[:16]}"

    def __contains__(self, digest: str) -> bool:
        if self._known is None:
            try:
                text = self.path.read_text("ascii", errors="replace")
            except OSError:
                text = ""
            self._known = {line for line in text.splitlines() if _LINE.fullmatch(line)}  # torn lines are ignored
        return digest in self._known

    def add(self, digest: str) -> None:
        """Remember ``digest`` (best effort: a read-only store just validates every time)."""
        if self._known is not None:
            self._known.add(digest)
        if not (self.root / "store.json").exists():
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, f"{digest}\n".encode())
            finally:
                os.close(fd)
