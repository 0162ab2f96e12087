"""Reference syntax: ``name[:tag]``, ``name@sha256:<hex>``, ``sha256:<hex>`` and digest prefixes.

Names and tags follow the OCI distribution rules, which also make them safe as relative paths:
no component can be empty, ``.`` or ``..``, none can start with ``/``, and no NUL or uppercase
letter can appear in a name. The name ``sha256`` is reserved: ``sha256:<x>`` always reads as a
digest, so a ref of that name could be written but never addressed again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterkit.errors import InvalidReferenceError

__all__ = ["DEFAULT_TAG", "DIGEST_RE", "Ref", "format_digest", "is_digest", "parse_ref", "parse_tag_ref"]

DEFAULT_TAG = "latest"
MAX_REF_LENGTH = 255
RESERVED_NAME = "sha256"
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """Whether ``text`` is a whole digest, ``sha256:`` and 64 lower-case hex digits."""
    return DIGEST_RE.fullmatch(text) is not None


_PREFIX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{4,64})")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a tag ref (name + tag), a pinned digest, or a digest prefix."""

    name: str | None = None
    tag: str | None = None
    digest: str | None = None
    #: Lowercase hex the user gave as a (possibly partial) digest.
    prefix: str | None = None

    def __str__(self) -> str:
        if self.name and self.digest:
            return f"{self.name}@{self.digest}"
        if self.name:
            return f"{self.name}:{self.tag}"
        return self.digest or f"sha256:{self.prefix}"


def format_digest(hexdigest: str) -> str:
    return f"sha256:{hexdigest}"


def _check_name(name: str, text: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidReferenceError(
            f"invalid adapter name {name!r} in {text!r}: use lowercase letters, digits and single separators "
            "(. _ -), with '/' between components"
        )
    if name == RESERVED_NAME:
        raise InvalidReferenceError(f"{text!r}: the name {RESERVED_NAME!r} is reserved for digests (sha256:<hex>)")


def parse_tag_ref(text: str) -> Ref:
    """Parse ``name[:tag]`` (the form that can be written to); the tag defaults to ``latest``."""
    _check_length(text)
    name, sep, tag = text.rpartition(":") if ":" in text else (text, "", "")
    if "@" in name:
        raise InvalidReferenceError(f"{text!r}: a digest reference cannot be written to; give NAME[:TAG]")
    _check_name(name, text)
    if sep and not TAG_RE.fullmatch(tag):
        raise InvalidReferenceError(
            f"invalid tag {tag!r} in {text!r}: up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        )
    return Ref(name=name, tag=tag if sep else DEFAULT_TAG)


def parse_ref(text: str) -> Ref:
    """Parse any reference a command can read from."""
    _check_length(text)
    if "@" in text:
        name, _, digest = text.partition("@")
        _check_name(name, text)
        if not DIGEST_RE.fullmatch(digest):
            raise InvalidReferenceError(f"{text!r}: expected NAME@sha256:<64 hex digits>")
        return Ref(name=name, digest=digest)
    if DIGEST_RE.fullmatch(text):
        return Ref(digest=text)
    if text.startswith("sha256:"):
        match = _PREFIX_RE.fullmatch(text)
        if not match:
            raise InvalidReferenceError(f"{text!r}: a digest prefix needs at least 4 lowercase hex digits")
        return Ref(prefix=match.group(1))
    return parse_tag_ref(text)


def _check_length(text: str) -> None:
    if not text:
        raise InvalidReferenceError("empty reference")
    if len(text) > MAX_REF_LENGTH:
        raise InvalidReferenceError(f"reference is {len(text)} characters long; the limit is {MAX_REF_LENGTH}")
    if "\x00" in text:
        raise InvalidReferenceError("reference contains a NUL character")


def digest_prefix(text: str) -> str | None:
    """The hex prefix ``text`` could stand for when no tag ref of that name exists."""
    match = _PREFIX_RE.fullmatch(text)
    return match.group(1) if match else None
