"""``hf://`` URLs: ``hf://[org/]name[@revision]``.

The repository id comes first and can never hold an ``@``, so the first ``@`` separates it from the
revision, which may itself hold ``/`` (``refs/pr/1``, ``feature/x``). Only model repositories are
addressed: datasets and Spaces cannot hold an adapter PEFT would load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterkit import InvalidReferenceError, parse_tag_ref

__all__ = ["SCHEME", "HubURL", "default_local_ref", "parse_hf_url"]

SCHEME = "hf"
#: The Hub's own rule for repository ids (``huggingface_hub.utils.validate_repo_id``), without importing it.
_REPO_ID_RE = re.compile(r"(?:[\w\-.]+/)?[\w\-.]{1,96}")
_REPO_TYPE_PREFIXES = ("datasets/", "spaces/", "models/")
_TAG_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class HubURL:
    """A model repository on a Hub and, optionally, one revision of it (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    def at(self, revision: str | None) -> str:
        """This repository's URL at ``revision`` (no revision: the bare repository)."""
        return f"{SCHEME}://{self.repo_id}" + (f"@{revision}" if revision else "")

    def __str__(self) -> str:
        return self.at(self.revision)


def parse_hf_url(url: str) -> HubURL:
    """Split ``hf://[org/]name[@revision]`` (``org/name[@revision]`` without the scheme is accepted too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        rest = url
    elif scheme.lower() != SCHEME:
        raise InvalidReferenceError(f"{url!r}: not an {SCHEME}:// URL")
    repo_id, at, revision = rest.partition("@")
    repo_id = repo_id.strip("/")
    if repo_id.startswith(_REPO_TYPE_PREFIXES) and repo_id.count("/") > 1:
        raise InvalidReferenceError(f"{url!r}: {SCHEME}:// URLs name model repositories: hf://org/name[@revision]")
    if (
        not _REPO_ID_RE.fullmatch(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.startswith(("-", "."))
        or repo_id.endswith((".", "-", ".git"))
        or "/." in repo_id
        or "/-" in repo_id
    ):
        raise InvalidReferenceError(f"{url!r}: expected hf://org/name[@revision] with a valid Hub repository id")
    if at and (not revision or any(ch.isspace() or not ch.isprintable() for ch in revision)):
        raise InvalidReferenceError(f"{url!r}: empty or malformed revision after '@'")
    return HubURL(repo_id=repo_id, revision=revision if at else None)


def default_local_ref(target: HubURL) -> str:
    """``name:tag`` a pull writes when the user gives none: the repository name, and the revision or ``latest``.

    Hub names may have uppercase letters, local names may not, so the name is lowercased; a revision
    such as ``refs/pr/1`` becomes the tag ``refs-pr-1``. Anything that still breaks the naming rules
    is refused with a hint, rather than silently renamed further.
    """
    name = target.name.lower()
    tag = _TAG_UNSAFE_RE.sub("-", target.revision).strip("-.") if target.revision else "latest"
    text = f"{name}:{tag}"
    try:
        parse_tag_ref(text)
    except InvalidReferenceError as exc:
        raise InvalidReferenceError(
            f"{target}: cannot name the local ref after it ({exc}); give --tag NAME[:TAG]"
        ) from None
    return text
