"""Push adapters to, and pull them from, a Hugging Face Hub model repository.

Layout of a pushed repository (``docs/remotes.md``)::

    adapter_config.json            the adapter's files, byte for byte as stored: PEFT loads the repo directly
    adapter_model.safetensors      (canonical safetensors; an LFS/Xet file on the Hub)
    README.md                      the model card (card.py): library_name peft, base_model, tags
    .adapterkit/manifest.json      the adapter's manifest: its sha256 is the adapter's digest
    .adapterkit/metadata.json      the metadata blob the manifest names
    .adapterkit/README.md          the adapter's own README, when it has one (the card at the root may differ)

A push is one commit made with ``parent_commit`` (the Hub's compare-and-swap: if the branch moved
since it was read, the commit fails and nothing changes) carrying only the files whose content the
Hub does not already have at that path, compared by LFS sha256 or git blob id before anything is
read or sent. The local tag, unless ``latest``, then becomes a Hub tag on that commit.

A pull resolves the revision to one commit first, so every file comes from the same commit even
while someone pushes. Every downloaded file is checked against the Hub's own record of it (LFS
sha256, or git blob id for small files) before anything else trusts it; with a manifest every blob
is also checked against the manifest, and the exact digest is restored; without one (any PEFT
repo) the files are imported as ``adapterkit add`` would. Blobs the store already has are not
downloaded. Nothing reaches the store until everything is downloaded and verified, and the local
ref is written last.

The Hub is reached with the usual huggingface_hub settings: token from ``HF_TOKEN`` or ``hf auth
login``, endpoint from ``HF_ENDPOINT`` (or the ``endpoint`` argument). Only calls that olah and the
Hub both serve are used: ``model_info`` always gets a revision, and neither ``repo_exists`` nor
``list_repo_commits`` is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit import (
    AdapterFormatError,
    AdapterkitError,
    AdapterStore,
    IntegrityError,
    InvalidInputError,
    InvalidReferenceError,
    Layer,
    PeftFormat,
    Progress,
    ReferenceNotFoundError,
    RemoteConflictError,
    Store,
    SyncError,
    TransferResult,
    parse_manifest,
    parse_tag_ref,
)
from adapterkit_hub.card import model_card
from adapterkit_hub.url import HubURL, default_local_ref, parse_hf_url

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

__all__ = ["MANIFEST_PATH", "METADATA_PATH", "HubRemote"]

CONFIG_NAME, WEIGHTS_NAME, BIN_NAME, README_NAME = (
    PeftFormat.CONFIG,
    PeftFormat.WEIGHTS,
    PeftFormat.BIN,
    PeftFormat.README,
)
META_DIR = ".adapterkit"
MANIFEST_PATH = f"{META_DIR}/manifest.json"
METADATA_PATH = f"{META_DIR}/metadata.json"
OWN_README_PATH = f"{META_DIR}/{README_NAME}"
#: Every path a push may write: what a push reads back to compare, and what it deletes when it no longer applies.
MANAGED_PATHS = (CONFIG_NAME, WEIGHTS_NAME, README_NAME, MANIFEST_PATH, METADATA_PATH, OWN_README_PATH)
#: Paths a pull looks at: the managed ones, and the weights of adapters saved without safetensors.
PULL_PATHS = (*MANAGED_PATHS, BIN_NAME)
DEFAULT_BRANCH = "main"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20
#: Exceptions from these packages mean "the Hub (or the way to it) failed", never a bug here.
_NETWORK_PACKAGES = frozenset({"huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3", "hf_xet"})


class _StaleManifest(Exception):
    """The repository's files changed after adapterkit pushed them: the manifest no longer describes them."""


@dataclass(frozen=True)
class _Source:
    """One file a push wants on the Hub: its bytes (small files) or the stored blob holding them."""

    path: str
    size: int
    sha256: str  #: hex, no prefix
    data: bytes | None = None
    blob: Path | None = None


def _git_blob_id(chunks: Iterator[bytes] | list[bytes], size: int) -> str:
    """git's object id of a blob: what the Hub reports (``blob_id``) for a file it keeps in git, not LFS."""
    hasher = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, AdapterkitError):
        return False
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".")[0] in _NETWORK_PACKAGES


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _describe(exc: BaseException) -> str:
    """A one-line account of a Hub failure: status and the server's message when there is one."""
    status = _http_status(exc)
    server = getattr(exc, "server_message", None)
    if status is not None:
        detail = _one_line(server) if server else _one_line(str(exc).splitlines()[0] if str(exc) else "")
        return f"HTTP {status}" + (f": {detail}" if detail else "")
    return f"{type(exc).__name__}: {_one_line(exc)}" if str(exc) else type(exc).__name__


@contextlib.contextmanager
def _quiet_hub_progress() -> Iterator[None]:
    """huggingface_hub's own progress bars (uploads by LFS or Xet) off for the duration, as they were after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _progress_bar(progress: Progress | None) -> Any:
    """A silent huggingface_hub progress-bar class that reports downloaded bytes to ``progress``."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Bar(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if progress is not None and n and n > 0:
                progress(int(n))
            return super().update(n)

    return _Bar


class HubRemote:
    """The ``hf://[org/]name[@revision]`` remote (see the module docstring)."""

    def __init__(self, url: str, *, endpoint: str | None = None, token: str | bool | None = None) -> None:
        self.url = url
        self.target = parse_hf_url(url)
        # huggingface_hub reads HF_ENDPOINT once, at import; reading it here too honours a later change.
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.token = token
        self._api: HfApi | None = None

    def __repr__(self) -> str:
        return f"HubRemote({self.url!r})"

    @property
    def api(self) -> HfApi:
        if self._api is None:
            from huggingface_hub import HfApi

            from adapterkit import __version__

            self._api = HfApi(
                endpoint=self.endpoint, token=self.token, library_name="adapterkit", library_version=__version__
            )
        return self._api

    @property
    def _host(self) -> str:
        return self.api.endpoint

    @contextlib.contextmanager
    def _hub(self, what: str, where: object = None) -> Iterator[None]:
        """Turn a Hub or network failure during ``what`` into a one-line SyncError."""
        try:
            yield
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            raise SyncError(f"{where or self.target}: {what} failed ({_describe(exc)}) at {self._host}") from exc

    # -- reading the Hub ---------------------------------------------------------------------------------

    def _resolve(self, target: HubURL) -> str:
        """The commit ``target``'s revision (default: ``main``) names, or ReferenceNotFoundError."""
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        revision = target.revision or DEFAULT_BRANCH
        with self._hub("reading the repository"):
            try:
                sha = self.api.model_info(target.repo_id, revision=revision).sha
            except (RepositoryNotFoundError, RevisionNotFoundError):
                sha = None
            if sha:
                return sha
            # olah answers a missing revision like a missing repository; the refs tell the two apart.
            if self._refs(target) is None:
                raise ReferenceNotFoundError(
                    f"{target.at(None)}: no such model repository at {self._host} (or no access to it: check HF_TOKEN)"
                )
        raise ReferenceNotFoundError(f"{target.at(None)}: no branch, tag or commit {revision!r} in the repository")

    def _refs(self, target: HubURL) -> tuple[dict[str, str], dict[str, str]] | None:
        """({branch: commit}, {tag: commit}), or None when the repository does not exist (or is not visible)."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            refs = self.api.list_repo_refs(target.repo_id)
        except HfHubHTTPError as exc:
            # The Hub says RepoNotFound (401/404); olah says 404 "refs are not cached locally".
            if _http_status(exc) in (401, 404):
                return None
            raise
        return (
            {b.name: b.target_commit for b in refs.branches},
            {t.name: t.target_commit for t in refs.tags},
        )

    def _paths_info(self, target: HubURL, commit: str, paths: tuple[str, ...]) -> dict[str, RepoFile]:
        from huggingface_hub.hf_api import RepoFile

        with self._hub("listing files", target.at(commit)):
            infos = self.api.get_paths_info(target.repo_id, list(paths), revision=commit)
        return {info.path: info for info in infos if isinstance(info, RepoFile)}

    # -- push ----------------------------------------------------------------------------------------------

    def push(
        self, store: AdapterStore, digest: str, name: str, tag: str, *, progress: Progress | None = None
    ) -> TransferResult:
        """Commit the adapter ``digest`` to the URL's branch (default ``main``) and tag it ``tag`` unless ``latest``."""
        target = self.target
        branch = target.revision or DEFAULT_BRANCH
        sources = self._sources(store, digest, target)
        head = self._branch_head(target, branch)
        where = target.at(branch)
        remote = self._paths_info(target, head, MANAGED_PATHS)
        changed = [s for s in sources if not self._same(s, remote.get(s.path))]
        wanted = {s.path for s in sources}
        stale = [path for path in remote if path.startswith(f"{META_DIR}/") and path not in wanted]
        sent = sum(s.size for s in changed)
        commit = head
        if changed or stale:
            commit = self._commit(target, branch, head, changed, stale, f"adapterkit push {name}:{tag} ({digest})")
            if progress is not None and sent:
                progress(sent)
        if tag != "latest":
            self._tag(target, tag, commit)
            where = target.at(tag)
        return TransferResult(
            digest=digest,
            ref=where,
            transferred_bytes=sent,
            skipped_bytes=sum(s.size for s in sources) - sent,
        )

    def _sources(self, store: AdapterStore, digest: str, target: HubURL) -> list[_Source]:
        """The files of the pushed repository, each checked against its digest before the Hub sees it."""
        config, layers = store.manifest(digest)
        manifest = store.manifest_bytes(digest)
        metadata_bytes = store.read_blob(config.digest, config.size, what=f"metadata of {digest}")
        metadata = store.metadata(digest)
        sources = [
            _Source(MANIFEST_PATH, len(manifest), digest.removeprefix("sha256:"), data=manifest),
            _Source(METADATA_PATH, config.size, config.digest.removeprefix("sha256:"), data=metadata_bytes),
        ]
        own_readme: bytes | None = None
        for layer in layers:
            if layer.title == README_NAME:
                own_readme = store.read_blob(layer.digest, layer.size, what=f"{README_NAME} of {digest}")
                path = OWN_README_PATH
            else:
                path = layer.title
            blob = store.blob_path(layer.digest)
            if not blob.is_file():
                raise ReferenceNotFoundError(
                    f"blob {layer.digest} ({layer.title}) of {digest} is missing from the store "
                    "(run `adapterkit verify`)"
                )
            sources.append(_Source(path, layer.size, layer.digest.removeprefix("sha256:"), blob=blob))
        card = model_card(metadata, digest, target.repo_id, own_readme)
        sources.append(_Source(README_NAME, len(card), hashlib.sha256(card).hexdigest(), data=card))
        return sources

    @staticmethod
    def _same(source: _Source, remote: RepoFile | None) -> bool:
        """Whether the Hub already has exactly ``source``'s bytes at its path (without sending any)."""
        if remote is None or remote.size != source.size:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == source.sha256
        chunks = [source.data] if source.data is not None else _file_chunks(source.blob)  # type: ignore[arg-type]
        return remote.blob_id == _git_blob_id(chunks, source.size)

    def _branch_head(self, target: HubURL, branch: str) -> str:
        """The commit ``branch`` points at, creating the repository or the branch first when missing.

        The refs list answers both "does the repository exist" and "where is the branch" in one call,
        on the Hub and on olah alike (``repo_exists`` is unreliable on olah).
        """
        where = target.at(branch)
        with self._hub("reading the repository", where):
            refs = self._refs(target)
            if refs is None:
                self.api.create_repo(target.repo_id, repo_type="model", exist_ok=True)
                refs = self._refs(target)
                if refs is None:
                    raise SyncError(
                        f"{target.at(None)}: cannot read the repository at {self._host} (no access? check HF_TOKEN)"
                    )
            branches, tags = refs
            if branch not in branches:
                if branch in tags or _COMMIT_RE.fullmatch(branch):
                    raise InvalidReferenceError(f"{where}: {branch!r} is not a branch; push to a branch")
                self.api.create_branch(target.repo_id, branch=branch, exist_ok=True)
                branches = (self._refs(target) or ({}, {}))[0]
        if not branches.get(branch):
            raise SyncError(f"{where}: the Hub reports no commit for the branch")
        return branches[branch]

    def _commit(
        self, target: HubURL, branch: str, head: str, changed: list[_Source], stale: list[str], message: str
    ) -> str:
        """One commit on ``branch`` whose parent must still be ``head``; returns its id."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations: list[Any] = []
        for source in changed:
            operation = CommitOperationAdd(source.path, source.data if source.data is not None else source.blob)
            # huggingface_hub hashed the bytes it will send: a blob changed on disk since it was stored stops here.
            if operation.upload_info.sha256.hex() != source.sha256 or operation.upload_info.size != source.size:
                raise IntegrityError(
                    f"blob sha256:{source.sha256} ({source.path}) does not match its digest (run `adapterkit verify`)"
                )
            operations.append(operation)
        operations += [CommitOperationDelete(path) for path in stale]
        where = target.at(branch)
        try:
            with _quiet_hub_progress():  # huggingface_hub's LFS/Xet bars would bury adapterkit's one-line report
                info = self.api.create_commit(
                    target.repo_id, operations, commit_message=message, revision=branch, parent_commit=head
                )
        except Exception as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, OSError):
                # huggingface_hub's verdict on the card's metadata (POST /api/validate-yaml), before any upload
                raise SyncError(f"{where}: the Hub refused the model card ({_one_line(exc)})") from exc
            if not _is_network_error(exc):
                raise
            if "xet-write-token" in str(exc) and re.search(r"\b404\b", str(exc)):
                # hf_xet is installed, so huggingface_hub uploads through Xet, and this Hub offers no Xet storage.
                raise SyncError(
                    f"{where}: the Hub at {self._host} offers no Xet storage (no Xet write token); "
                    "set HF_HUB_DISABLE_XET=1 to upload with Git LFS; nothing was changed"
                ) from exc
            if _http_status(exc) in (409, 412):
                raise RemoteConflictError(
                    f"{where} moved while pushing (its head is no longer {head[:12]}): "
                    "another push won; pull or push again"
                ) from exc
            raise SyncError(f"{where}: commit failed ({_describe(exc)}) at {self._host}; nothing was changed") from exc
        return str(info.oid)

    def _tag(self, target: HubURL, tag: str, commit: str) -> None:
        """Point the Hub tag ``tag`` at ``commit``: created, or moved from another commit (registry tags move)."""
        from huggingface_hub.errors import HfHubHTTPError

        where = target.at(tag)
        with self._hub("tagging", where):
            refs = self._refs(target)
            current = refs[1].get(tag) if refs is not None else None
            if current == commit:
                return
            if refs is not None and tag in refs[0]:
                raise InvalidReferenceError(f"{where}: {tag!r} is a branch of the repository; push with another tag")
            if current is not None:
                self.api.delete_tag(target.repo_id, tag=tag)
            try:
                self.api.create_tag(target.repo_id, tag=tag, revision=commit)
            except HfHubHTTPError as exc:
                if _http_status(exc) != 409:
                    raise
                raise RemoteConflictError(f"{where} was created by someone else while pushing; push again") from exc

    # -- pull ----------------------------------------------------------------------------------------------

    def pull(
        self, store: Store, source: str | None = None, tag: str | None = None, *, progress: Progress | None = None
    ) -> TransferResult:
        """Fetch the adapter at the URL's revision (default ``main``) and point ``tag`` at it.

        ``source`` may name another repository or revision of the same Hub (``org/name[@rev]`` or a
        whole ``hf://`` URL); ``tag`` defaults to the repository name and the revision or ``latest``.
        """
        target = parse_hf_url(source) if source else self.target
        local = parse_tag_ref(tag if tag is not None else default_local_ref(target))
        commit = self._resolve(target)
        at = target.at(commit)
        files = self._paths_info(target, commit, PULL_PATHS)
        with tempfile.TemporaryDirectory(prefix="adapterkit-hf-") as tmp:
            fetch = _Fetcher(self, target, commit, Path(tmp), progress)
            if MANIFEST_PATH in files:
                try:
                    digest = self._pull_manifest(store, fetch, files, local.name, local.tag, str(target))
                except _StaleManifest as exc:
                    warnings.warn(f"adapterkit: {at}: {exc}; importing its files as a plain PEFT adapter", stacklevel=2)
                else:
                    return TransferResult(digest, f"{local.name}:{local.tag}", fetch.received, fetch.skipped)
            digest = self._pull_plain(store, fetch, files, local.name, local.tag, str(target))
        return TransferResult(digest, f"{local.name}:{local.tag}", fetch.received, fetch.skipped)

    def _pull_manifest(
        self, store: Store, fetch: _Fetcher, files: dict[str, RepoFile], name: str, tag: str, url: str
    ) -> str:
        """Restore the exact adapter ``.adapterkit/manifest.json`` describes."""
        manifest_bytes = fetch.read(files[MANIFEST_PATH])
        digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        try:
            config, layers = parse_manifest(manifest_bytes, f"{fetch.at}: {MANIFEST_PATH}")
        except AdapterkitError as exc:
            raise SyncError(f"{fetch.at}: {MANIFEST_PATH} is not an adapterkit manifest ({exc})") from None
        wanted = [(METADATA_PATH, config)]
        for layer in layers:
            own = f"{META_DIR}/{layer.title}"
            wanted.append((own if own in files else layer.title, layer))
        fetched: dict[str, Path] = {}
        for path, layer in wanted:
            if store.has_blob(layer.digest, layer.size):
                fetch.skipped += layer.size
                continue
            info = files.get(path)
            if info is None:
                raise _StaleManifest(f"{path} (named by {MANIFEST_PATH}) is not in the repository")
            if info.lfs is not None and info.lfs.sha256 != layer.digest.removeprefix("sha256:"):
                raise _StaleManifest(f"{path} no longer matches {MANIFEST_PATH}")
            local, sha256 = fetch.get(info)
            if f"sha256:{sha256}" != layer.digest or info.size != layer.size:
                # The bytes are what the Hub holds (fetch.get checked them): the repository changed after the push.
                raise _StaleManifest(f"{path} no longer matches {MANIFEST_PATH}")
            fetched[layer.digest] = local

        def read(layer: Layer) -> Iterator[bytes]:
            local = fetched.get(layer.digest)
            if local is None:  # held when the pull began, gone since (a gc): the store's copy is what was checked
                raise SyncError(f"{url}: blob {layer.digest} left the store while pulling (gc?); pull again")
            return _file_chunks(local)

        store.receive(manifest_bytes, read, f"{name}:{tag}", f"pull {url} ({fetch.commit})", where=fetch.at)
        return digest

    def _pull_plain(
        self, store: Store, fetch: _Fetcher, files: dict[str, RepoFile], name: str, tag: str, url: str
    ) -> str:
        """Import the PEFT files of any adapter repository, as ``adapterkit add`` would."""
        if CONFIG_NAME not in files:
            raise AdapterFormatError(f"{fetch.at}: not a PEFT adapter repository (no {CONFIG_NAME})")
        weights = WEIGHTS_NAME if WEIGHTS_NAME in files else BIN_NAME if BIN_NAME in files else None
        if weights is None:
            raise AdapterFormatError(f"{fetch.at}: no {WEIGHTS_NAME} (or {BIN_NAME}) in the repository")
        folder = fetch.tmp / "adapter"
        folder.mkdir()
        for path in (CONFIG_NAME, weights, README_NAME):
            info = files.get(path)
            if info is None:
                continue
            have = f"sha256:{info.lfs.sha256}" if info.lfs is not None else None
            if have is not None and store.has_blob(have, info.size):
                shutil.copyfile(store.blob_path(have), folder / path)  # the Hub's sha256 names a blob the store holds
                fetch.skipped += info.size
                continue
            local, _ = fetch.get(info)
            os.replace(local, folder / path)
        try:
            added = store.add(folder, f"{name}:{tag}", message=f"pull {url} ({fetch.commit})")
        except InvalidInputError as exc:
            # Name the Hub file, not the temp folder it was downloaded to.
            message = str(exc).replace(f"{folder}{os.sep}", "")
            raise type(exc)(f"{fetch.at}: {message}") from None
        return added.digest


class _Fetcher:
    """Downloads files of one commit into a private temp dir, each checked against the Hub's record of it."""

    def __init__(self, remote: HubRemote, target: HubURL, commit: str, tmp: Path, progress: Progress | None) -> None:
        self.remote = remote
        self.target = target
        self.commit = commit
        self.at = target.at(commit)
        self.tmp = tmp
        self.progress = progress
        self.received = 0
        self.skipped = 0
        self._count = 0

    def get(self, info: RepoFile) -> tuple[Path, str]:
        """(a private copy of ``info``'s file, its sha256 hex), or IntegrityError if it is not what the Hub says."""
        with self.remote._hub(f"downloading {info.path}", self.at):
            cached = self.remote.api.hf_hub_download(
                self.target.repo_id,
                info.path,
                revision=self.commit,
                cache_dir=self.tmp / "cache",
                tqdm_class=_progress_bar(self.progress),
            )
        self._count += 1
        local = self.tmp / f"file-{self._count}"
        sha256 = hashlib.sha256()
        size = 0
        with Path(cached).open("rb") as src, local.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                sha256.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        if info.lfs is not None:
            ok = size == info.lfs.size and sha256.hexdigest() == info.lfs.sha256
            expected = f"sha256 {info.lfs.sha256}"
        else:
            ok = size == info.size and _git_blob_id(_file_chunks(local), size) == info.blob_id
            expected = f"git blob {info.blob_id}"
        if not ok:
            raise IntegrityError(
                f"{self.at}: {info.path} as downloaded ({size} bytes) does not match the Hub's {expected}; "
                "nothing was stored, pull again"
            )
        self.received += size
        return local, sha256.hexdigest()

    def read(self, info: RepoFile) -> bytes:
        return self.get(info)[0].read_bytes()
