"""Whether adapters (and a base model) belong to one base: the single rule compose, merge, attach and inspect apply.

An adapter knows its base by up to three marks: the name in its PEFT config
(``base_model_name_or_path``), the base's structure fingerprint (recorded by ``add --base``) and
its content digest (``add --base --content``). Any of them may be missing, so a rule that looks
at one mark alone can be bypassed by leaving it out: an adapter without a fingerprint used to
blend with a fingerprinted one whatever their names said. The rule here compares every mark
that *both* sides of each pair carry:

* structure fingerprints must be equal;
* content digests must be equal (two bases with one architecture but different weights, such
  as a model and its chat fine-tune, share a structure fingerprint but not a content digest);
* names must be equal where both are Hub repository ids (``org/name`` or a bare ``name``,
  compared without regard to case, and not an existing local directory). A local path
  (``/models/llama``, ``./base``, ``~/x``, or ``demo/base`` where that folder exists) may be a
  copy of any repository, so it is never held against a repository id or another path.
  When the names differ but both sides carry equal structure fingerprints, the pair is accepted
  with a warning naming both (same architecture, possibly other weights); when either side lacks
  a fingerprint, different names are all there is to go on, and the pair is refused.

``force`` accepts any disagreement. A blend records the base entry of one parent, whole: the
first parent with the most marks (a fingerprint first, then a content digest, then a name).
Since every pair agreed, that entry is consistent with every parent's; it never pairs one
parent's name with another's fingerprint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.errors import BaseModelError, IncompatibleAdaptersError

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter

__all__ = ["BaseIdentity", "reconcile", "repo_id"]

#: A Hugging Face repository id: ``name`` or ``org/name``, letters, digits, ``.``, ``_`` and ``-``.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def repo_id(name: str | None) -> str | None:
    """``name`` as a comparable Hub repository id (lower case), or None for a local path or no name.

    transformers' own rule decides: a name that is an existing directory here is a path (a model
    loaded with ``from_pretrained("models/llama")`` records exactly that), anything else shaped like
    ``org/name`` or ``name`` is a repository id.
    """
    if not name:
        return None
    text = name.strip()
    if ".." in text or not _REPO_ID.fullmatch(text):
        return None  # "/abs", "./rel", "~/x", "C:\\x", "a/b/c": a path on some machine
    if os.path.isdir(text):
        return None  # "models/llama" next to the caller: a local folder, whatever it was copied from
    return text.lower()


@dataclass(frozen=True)
class BaseIdentity:
    """The marks one side of a comparison carries, and how to name that side in a message."""

    label: str
    name: str | None = None
    revision: str | None = None
    structure_digest: str | None = None
    content_digest: str | None = None
    #: True for a base model itself (a folder or a live model), False for an adapter's record of its base.
    is_base: bool = False

    @classmethod
    def of_adapter(cls, adapter: Adapter, label: str) -> BaseIdentity:
        """What ``adapter`` records of its base: its metadata's ``base_model``, else its PEFT config."""
        base = (adapter.metadata or {}).get("base_model") or {}
        name = base.get("name") or adapter.config.get("base_model_name_or_path")
        revision = base.get("revision") if base else adapter.config.get("revision")
        return cls(
            label=label,
            name=str(name) if name else None,
            revision=revision,
            structure_digest=base.get("structure_digest"),
            content_digest=base.get("content_digest"),
        )

    @property
    def marks(self) -> int:
        return (self.structure_digest is not None) * 4 + (self.content_digest is not None) * 2 + (self.name is not None)

    def entry(self) -> dict[str, Any] | None:
        """The metadata ``base_model`` entry for a result derived from this side (None when it carries nothing)."""
        if not self.marks:
            return None
        entry: dict[str, Any] = {
            "name": self.name,
            "revision": self.revision,
            "structure_digest": self.structure_digest,
        }
        if self.content_digest is not None:
            entry["content_digest"] = self.content_digest
        return entry


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def _conflict(a: BaseIdentity, b: BaseIdentity, verb: str) -> Exception | str | None:
    """An error for a pair that disagrees, a warning (str) for one that is accepted with a doubt, else None.

    A pair that involves the base itself (``is_base``) is a :class:`BaseModelError`; two adapters
    that disagree are :class:`IncompatibleAdaptersError`.
    """
    if b.is_base and not a.is_base:
        return _against_base(a, b, verb)
    if a.is_base and not b.is_base:
        return _against_base(b, a, verb)
    if a.structure_digest and b.structure_digest and a.structure_digest != b.structure_digest:
        return IncompatibleAdaptersError(
            f"adapters were made for different base models (fingerprints {_short(a.structure_digest)} of "
            f"{a.label}, {_short(b.structure_digest)} of {b.label}); use --force to {verb} them anyway"
        )
    if a.content_digest and b.content_digest and a.content_digest != b.content_digest:
        return IncompatibleAdaptersError(
            f"{a.label} and {b.label} were made for bases of one structure but different weights (content "
            f"digests {_short(a.content_digest)} and {_short(b.content_digest)}); use --force to {verb} them anyway"
        )
    if not _names_differ(a, b):
        return None
    if a.structure_digest and b.structure_digest:
        return _doubt(a, b)
    return IncompatibleAdaptersError(
        f"adapters name different base models ({a.name}, {b.name}) and no fingerprints show they are one "
        f"model; use --force to {verb} them anyway"
    )


def _against_base(adapter: BaseIdentity, base: BaseIdentity, verb: str) -> Exception | str | None:
    """:func:`_conflict` for an adapter's record of its base held against the base itself."""
    if adapter.structure_digest and base.structure_digest and adapter.structure_digest != base.structure_digest:
        return BaseModelError(
            f"{adapter.label} was made for base {_short(adapter.structure_digest)}, but {base.label} is "
            f"{_short(base.structure_digest)} (structure fingerprints differ); use --force to {verb} anyway"
        )
    if adapter.content_digest and base.content_digest and adapter.content_digest != base.content_digest:
        return BaseModelError(
            f"{adapter.label} was made for base weights {_short(adapter.content_digest)}, but {base.label} holds "
            f"{_short(base.content_digest)} (one structure, different weights); use --force to {verb} anyway"
        )
    if not _names_differ(adapter, base):
        return None
    if adapter.structure_digest and base.structure_digest:
        return _doubt(adapter, base)
    return BaseModelError(
        f"{adapter.label} names base model {adapter.name!r} but {base.label} is {base.name!r}, and no fingerprints "
        f"show they are one model; use --force to {verb} anyway"
    )


def _names_differ(a: BaseIdentity, b: BaseIdentity) -> bool:
    """Both name a Hub repository, different ones, and no pair of equal content digests says they are one."""
    first, second = repo_id(a.name), repo_id(b.name)
    if first is None or second is None or first == second:
        return False
    return not (a.content_digest and b.content_digest)  # equal (checked first): one base under two names


def _doubt(a: BaseIdentity, b: BaseIdentity) -> str:
    return (
        f"{a.label} names base model {a.name!r} and {b.label} names {b.name!r}: their structure fingerprints "
        "match, but their weights may differ (a fine-tune of the same architecture?)"
    )


def reconcile(
    sides: Sequence[BaseIdentity], *, force: bool = False, verb: str = "blend"
) -> tuple[dict[str, Any] | None, list[str]]:
    """Check every pair of ``sides`` (see the module docstring); returns the result's base entry and warnings.

    Raises :class:`~adapterkit.errors.IncompatibleAdaptersError` for two adapters that disagree,
    :class:`~adapterkit.errors.BaseModelError` when one side is the base itself, unless ``force``.
    ``verb`` completes the advice "use --force to VERB [them] anyway". Warnings are plain sentences,
    one per pair of names, for the caller to show.
    """
    warnings: dict[frozenset[str | None], str] = {}  # one per pair of names, however many sides carry them
    for i, a in enumerate(sides):
        for b in sides[i + 1 :]:
            found = _conflict(a, b, verb)
            if isinstance(found, str):
                warnings.setdefault(frozenset((repo_id(a.name), repo_id(b.name))), found)
            elif found is not None and not force:
                raise found
    adapters = [side for side in sides if not side.is_base]
    best = max(adapters, key=lambda side: side.marks, default=None)  # max keeps the first of equals
    return (best.entry() if best is not None else None), list(warnings.values())
