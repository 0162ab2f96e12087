"""A Hugging Face Hub for tests, on 127.0.0.1 only: olah serves every read, a small front-end does the writes.

No installable server implements the Hub's write API (see design/research/hubserver.md), so writes are
hand-written here, and kept honest by never serving a read themselves: every push is read back through
olah's independent implementation of the read API (``revision``, ``paths-info``, ``refs``, ``resolve``),
which reads the same git repositories.

* olah runs as a subprocess in offline mode, serving git repos under ``<root>/mirrors/models/<org>/<name>``.
  LFS files are committed as pointer files, their content under
  ``.git/lfs/objects/<oid[:2]>/<oid[2:4]>/<oid>``, as git-lfs lays them out.
* :class:`HubServer` (a ``ThreadingHTTPServer``) is the endpoint the client talks to. It answers the write
  routes huggingface_hub uses (``repos/create``, ``validate-yaml``, ``preupload``, the NDJSON ``commit``
  with its ``parentCommit`` check, ``tag`` and ``branch``) by committing with git plumbing into those
  repos, and forwards everything else to olah.
* Large files take the path they take on the Hub: ``preupload`` answers ``lfs`` for paths matching the
  repo's ``.gitattributes`` LFS patterns (``*.safetensors``, ``*.bin``, ...) and for files over 10 MiB,
  ``regular`` (base64 inside the commit) otherwise. The Git LFS batch API
  (``POST /{repo}.git/info/lfs/objects/batch``) offers the ``basic`` transfer only: an upload action
  (``PUT`` of the bytes to a URL signed for that object, checked against its sha256 and size) and a
  ``verify`` action, none for an object the repo already holds; a download action per object. Commits
  name LFS files by ``lfsFile`` lines, refused unless the object was uploaded. Reads of LFS files go
  through olah, which answers with the LFS sha256 as ``ETag``, as the Hub does. No Xet: the
  ``xet-write-token`` route answers 404, so a client must be told ``HF_HUB_DISABLE_XET=1``.
* It records what it received (:attr:`HubServer.commits`, :attr:`HubServer.requests`,
  :attr:`HubServer.lfs_uploads`) so tests can assert from the server side, e.g. that a second push sent
  no file bytes; and it injects faults on request
  (:meth:`HubServer.fault`): a connection dropped mid-body, corrupted bytes, an error status, or a
  callback run before a commit is applied (to race another push against it).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = [
    "LFS_THRESHOLD",
    "LICENSES",
    "VALIDATED_RULES",
    "CommitRecord",
    "Fault",
    "GitRepo",
    "HubServer",
    "LfsUpload",
    "lfs_pointer",
]

HOST = "127.0.0.1"
#: The LFS rules of the Hub's default ``.gitattributes`` that matter for adapters.
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hub",
    "GIT_AUTHOR_EMAIL": "hub@example.invalid",
    "GIT_COMMITTER_NAME": "hub",
    "GIT_COMMITTER_EMAIL": "hub@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}
_WRITE_ROUTE = re.compile(
    r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<action>preupload|commit|tag|branch|xet-write-token)/(?P<rev>.+)"
)
_LFS_ROUTE = re.compile(
    r"/(?P<repo>[^/]+(?:/[^/]+)?)\.git/info/lfs/(?P<action>objects/batch|objects/[0-9a-f]{64}|verify)"
)
#: Files above this size go to LFS whatever their name, as on the Hub (which refuses larger regular files).
LFS_THRESHOLD = 10 * 1024 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}
_REPO_ID = re.compile(r"[\w.-]+(?:/[\w.-]+)?")
#: The license ids the Hub accepts in a card: the table of huggingface/hub-docs docs/hub/repositories-licenses.md
#: (commit 008d54d), plus the Llama 3.x ids the Hub added later (meta-llama's own cards use them). An id the Hub
#: added after these is refused here though the Hub accepts it: add it.
LICENSES = frozenset(
    [
        "apache-2.0",
        "mit",
        "openrail",
        "bigscience-openrail-m",
        "creativeml-openrail-m",
        "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "c-uda",
        "cc",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-2.5",
        "cc-by-3.0",
        "cc-by-4.0",
        "cc-by-sa-3.0",
        "cc-by-sa-4.0",
        "cc-by-nc-2.0",
        "cc-by-nc-3.0",
        "cc-by-nc-4.0",
        "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0",
        "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0",
        "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0",
        "cdla-permissive-1.0",
        "cdla-permissive-2.0",
        "wtfpl",
        "ecl-2.0",
        "epl-1.0",
        "epl-2.0",
        "etalab-2.0",
        "eupl-1.1",
        "agpl-3.0",
        "gfdl",
        "gpl",
        "gpl-2.0",
        "gpl-3.0",
        "lgpl",
        "lgpl-2.1",
        "lgpl-3.0",
        "isc",
        "lppl-1.3c",
        "ms-pl",
        "mpl-2.0",
        "odc-by",
        "odbl",
        "openrail++",
        "osl-3.0",
        "postgresql",
        "ofl-1.1",
        "ncsa",
        "unlicense",
        "zlib",
        "pddl",
        "lgpl-lr",
        "deepfloyd-if-license",
        "llama2",
        "gemma",
        "unknown",
        "other",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
    ]
)
#: What ``validate-yaml`` checks, out of what the Hub checks (its rules are not published; these are the ones
#: its documentation states and a PEFT card can break). NOT checked here, though the Hub may refuse them:
#: the ``model-index`` / eval results schema, ``language`` codes, ``pipeline_tag`` and ``library_name``
#: values, whether ``base_model`` and ``datasets`` name repositories that exist, ``license_name`` /
#: ``license_link`` with ``license: other``, ``widget`` and ``inference`` entries, tag lengths.
VALIDATED_RULES = (
    "the front matter is YAML and a mapping",
    "license, if present, is one of LICENSES (a string, or a list of them)",
    "base_model, if present and not empty, is a Hub model id or a list of them",
    "tags, if present, is a list of strings",
)


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file committed in place of ``data``."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def is_lfs_path(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` matches one of the ``.gitattributes`` LFS patterns (by its name or its whole path)."""
    return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) or fnmatch.fnmatch(path, p) for p in patterns)


class GitError(Exception):
    pass


class GitRepo:
    """One model repository: a non-bare git repo olah serves, written only through git plumbing.

    Commits are built in a private index file and published with ``git update-ref NEW OLD``, git's own
    compare-and-swap, so concurrent writers can never lose a commit even without the server's lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def git(self, *args: str, data: bytes | None = None, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            ["git", *args],
            cwd=self.path,
            input=data,
            capture_output=True,
            env={**os.environ, **_GIT_ENV, **(env or {})},
            check=False,
        )
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode().strip()

    @classmethod
    def init(cls, path: Path) -> GitRepo:
        """A new repository holding the Hub's initial commit (``.gitattributes``), as ``create_repo`` makes.

        Built aside and renamed into place, so olah never serves a repository without its first commit.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        repo = cls(staging)
        repo.git("init", "-q", "-b", "main")
        repo.commit("main", None, {".gitattributes": GITATTRIBUTES}, [], "initial commit")
        os.rename(staging, path)
        return cls(path)

    def resolve(self, revision: str) -> str | None:
        """The commit a branch, tag or full commit id names (None when it names nothing)."""
        for candidate in (f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
            try:
                return self.git("rev-parse", "--verify", "-q", f"{candidate}^{{commit}}")
            except GitError:
                continue
        return None

    def branch_head(self, branch: str) -> str | None:
        try:
            return self.git("rev-parse", "--verify", "-q", f"refs/heads/{branch}")
        except GitError:
            return None

    def entry(self, commit: str, path: str) -> str | None:
        """The blob id at ``path`` in ``commit``."""
        line = self.git("ls-tree", commit, "--", path)
        return line.split()[2] if line else None

    def read(self, commit: str, path: str) -> bytes | None:
        """The content at ``path`` (an LFS file's real bytes, not its pointer)."""
        oid = self.entry(commit, path)
        if oid is None:
            return None
        data = subprocess.run(["git", "cat-file", "blob", oid], cwd=self.path, capture_output=True, check=True).stdout
        match = re.fullmatch(
            rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize \d+\n", data
        )
        return self.lfs_object(match.group(1).decode()).read_bytes() if match else data

    def lfs_object(self, oid: str) -> Path:
        return self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def lfs_patterns(self, commit: str | None) -> list[str]:
        raw = (self.read(commit, ".gitattributes") if commit else None) or GITATTRIBUTES
        return [line.split()[0] for line in raw.decode().splitlines() if "filter=lfs" in line and line.split()]

    def remote_oid(self, commit: str, path: str) -> str | None:
        """What the Hub's preupload reports for an existing file: its LFS sha256, else its git blob id."""
        oid = self.entry(commit, path)
        if oid is None:
            return None
        data = subprocess.run(["git", "cat-file", "blob", oid], cwd=self.path, capture_output=True, check=True).stdout
        match = re.match(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})", data)
        return match.group(1).decode() if match else oid

    def has_lfs_object(self, oid: str, size: int | None = None) -> bool:
        path = self.lfs_object(oid)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def commit(
        self,
        branch: str,
        parent: str | None,
        adds: dict[str, bytes],
        deletes: list[str],
        message: str,
        lfs_files: dict[str, tuple[str, int]] | None = None,
    ) -> str:
        """Commit on ``branch`` if it still points at ``parent``; raises GitError if it moved.

        ``adds`` are contents (stored as LFS when they match the LFS patterns); ``lfs_files`` name LFS
        objects already in the repo's LFS storage by (sha256, size).
        """
        patterns = self.lfs_patterns(parent)
        with tempfile.TemporaryDirectory(dir=self.path / ".git") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                self.git("read-tree", parent, env=env)
            else:
                self.git("read-tree", "--empty", env=env)
            for path in deletes:
                prefix = path.rstrip("/")
                tracked = self.git("ls-files", "--cached", "--", prefix, env=env).splitlines()
                for tracked_path in tracked:
                    self.git("update-index", "--force-remove", "--", tracked_path, env=env)
            for path, content in adds.items():
                if is_lfs_path(path, patterns):
                    obj = self.lfs_object(hashlib.sha256(content).hexdigest())
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    if not obj.exists():  # written aside and renamed: a concurrent reader sees all or nothing
                        staged = Path(tmp) / "lfs-object"
                        staged.write_bytes(content)
                        os.replace(staged, obj)
                    content = lfs_pointer(content)
                oid = self.git("hash-object", "-w", "--stdin", data=content)
                self.git("update-index", "--add", "--cacheinfo", f"100644,{oid},{path}", env=env)
            for path, (sha256, size) in (lfs_files or {}).items():
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
                oid = self.git("hash-object", "-w", "--stdin", data=pointer)
                self.git("update-index", "--add", "--cacheinfo", f"100644,{oid},{path}", env=env)
            tree = self.git("write-tree", env=env)
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        new = self.git(*args)
        self.git("update-ref", f"refs/heads/{branch}", new, parent or "0" * 40)
        return new

    def tag(self, tag: str, commit: str) -> None:
        """Create ``tag``; raises GitError if it exists."""
        self.git("update-ref", f"refs/tags/{tag}", commit, "0" * 40)


@dataclass
class CommitRecord:
    """One commit the write front-end accepted."""

    repo_id: str
    branch: str
    oid: str
    parent: str
    #: path -> number of content bytes the commit itself carried for it (base64-decoded; 0 for an LFS file)
    files: dict[str, int]
    deleted: list[str]
    #: path -> sha256 of the files the commit named by an ``lfsFile`` line (their bytes came by LFS upload)
    lfs: dict[str, str] = field(default_factory=dict)

    @property
    def received_bytes(self) -> int:
        return sum(self.files.values())


@dataclass(frozen=True)
class LfsUpload:
    """One object received by an LFS ``basic`` upload (a PUT)."""

    repo_id: str
    oid: str
    size: int


@dataclass
class Fault:
    """A misbehaviour for the next ``times`` requests whose method is ``method`` and whose path ends with ``path``.

    kind: ``drop`` (send the headers and half the body, then close), ``corrupt`` (flip a byte of the body),
    ``status`` (answer ``status`` without doing anything) or ``call`` (run ``callback``, then go on).
    """

    kind: str
    path: str
    method: str = "GET"
    times: int = 1
    status: int = 500
    callback: Callable[[], None] | None = None
    hits: int = 0


@dataclass
class _State:
    commits: list[CommitRecord] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lfs_uploads: list[LfsUpload] = field(default_factory=list)


class HubServer:
    """olah (reads) behind a write front-end (writes), both on 127.0.0.1; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.state = _State()
        #: When set, write routes require ``Authorization: Bearer <token>``.
        self.require_token: str | None = None
        self._lock = threading.Lock()
        self._repo_locks: dict[str, threading.Lock] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._olah: subprocess.Popen[bytes] | None = None
        self.olah_port = 0
        #: signature -> (repo, oid, size) of the upload URLs the batch API handed out (like presigned URLs)
        self._signed: dict[str, tuple[str, str, int]] = {}

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None
        return f"http://{HOST}:{self._httpd.server_address[1]}"

    @property
    def olah_endpoint(self) -> str:
        return f"http://{HOST}:{self.olah_port}"

    def start(self, timeout: float = 30.0) -> None:
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((HOST, 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # idle keep-alive connections must not hold up stop()
        self.olah_port = _free_port()
        config = self.root / "olah.toml"
        # olah writes absolute URLs (redirects) with mirror-netloc: point them at the front-end, so nothing
        # reaches olah except through it (and its faults).
        config.write_text(
            "[basic]\n"
            f'host = "{HOST}"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "{HOST}:{self._httpd.server_address[1]}"\n'
            f'mirror-lfs-netloc = "{HOST}:{self._httpd.server_address[1]}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n",
            "utf-8",
        )
        log = (self.root / "olah.out").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        self._olah = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(self.root / "olah-logs")],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._olah.poll() is not None:
                raise RuntimeError(f"olah exited with {self._olah.returncode}: {self.olah_log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.olah_port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"olah did not listen on {self.olah_port} within {timeout}s")
            time.sleep(0.05)
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._olah is not None and self._olah.poll() is None:
            self._olah.send_signal(signal.SIGTERM)
            try:
                self._olah.wait(10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
                self._olah.wait(5)

    def olah_log(self) -> str:
        path = self.root / "olah.out"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    # -- test helpers --------------------------------------------------------------------------------------

    @property
    def commits(self) -> list[CommitRecord]:
        return self.state.commits

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.state.requests

    @property
    def lfs_uploads(self) -> list[LfsUpload]:
        return self.state.lfs_uploads

    def lfs_objects(self, repo_id: str) -> list[Path]:
        """Every object in the repository's LFS storage."""
        repo = self.repo(repo_id)
        assert repo is not None, repo_id
        root = repo.path / ".git" / "lfs" / "objects"
        return sorted(p for p in root.glob("*/*/*") if p.is_file()) if root.is_dir() else []

    def reset(self) -> None:
        """Forget recorded commits, requests and pending faults (the repositories stay)."""
        with self._lock:
            self.state = _State()
        self.require_token = None

    def fault(self, kind: str, path: str, **kwargs: Any) -> Fault:
        fault = Fault(kind, path, **kwargs)
        with self._lock:
            self.state.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str, kinds: tuple[str, ...]) -> Fault | None:
        with self._lock:
            for fault in self.state.faults:
                if fault.kind in kinds and fault.method == method and path.endswith(fault.path):
                    fault.hits += 1
                    if fault.hits >= fault.times:
                        self.state.faults.remove(fault)
                    return fault
        return None

    def repo(self, repo_id: str) -> GitRepo | None:
        path = self.mirrors / "models" / repo_id
        return GitRepo(path) if (path / ".git").is_dir() else None

    def create_repo(self, repo_id: str) -> GitRepo:
        existing = self.repo(repo_id)
        return existing if existing is not None else GitRepo.init(self.mirrors / "models" / repo_id)

    def delete_repo(self, repo_id: str) -> None:
        shutil.rmtree(self.mirrors / "models" / repo_id, ignore_errors=True)

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        message: str = "upload",
        tags: tuple[str, ...] = (),
        branch: str = "main",
        deletes: tuple[str, ...] = (),
    ) -> str:
        """Commit ``files`` directly (not through the API): a repository someone else published."""
        repo = self.create_repo(repo_id)
        with self._repo_lock(repo_id):
            commit = repo.commit(branch, repo.branch_head(branch), files, list(deletes), message)
            for tag in tags:
                repo.tag(tag, commit)
        return commit

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of the repository at ``revision``, LFS files with their real content."""
        repo = self.repo(repo_id)
        assert repo is not None, repo_id
        commit = repo.resolve(revision)
        assert commit is not None, revision
        paths = repo.git("ls-tree", "-r", "--name-only", commit).splitlines()
        return {path: repo.read(commit, path) or b"" for path in paths}

    def _repo_lock(self, repo_id: str) -> threading.Lock:
        with self._lock:
            return self._repo_locks.setdefault(repo_id, threading.Lock())


def _is_repo_id(value: object) -> bool:
    """A repository id by the Hub's rules, as huggingface_hub checks them (``validate_repo_id``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)  # type: ignore[arg-type]
    except (HFValidationError, TypeError):
        return False
    return isinstance(value, str)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class _Reply(Exception):
    """Answer the current request with ``status`` and a Hub-style JSON error."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm meets the client's
        # delayed ACK and every response waits ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body in pieces, sent with a Content-Length or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        with self.hub._lock:
            self.hub.state.requests.append((self.command, path))
        try:
            status_fault = self.hub._take_fault(self.command, path, ("status",))
            if status_fault is not None:
                self._body()
                raise _Reply(status_fault.status, "injected failure")
            call = self.hub._take_fault(self.command, path, ("call",))
            if call is not None and call.callback is not None:
                call.callback()
            route = self._route(path)
            if route is None:
                self._proxy(path)
            else:
                handler, needs_token = route
                if needs_token:
                    self._check_token()
                handler()
        except _Reply as reply:
            headers = {"X-Error-Message": reply.message}
            if reply.code:
                headers["X-Error-Code"] = reply.code
            self._send(reply.status, {"error": reply.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _route(self, path: str) -> tuple[Callable[[], None], bool] | None:
        """(handler, whether it needs the write token) for the routes served here; None for olah's."""
        if self.command == "POST" and path == "/api/repos/create":
            return self._create_repo, True
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml, True
        lfs = _LFS_ROUTE.fullmatch(path)
        if lfs is not None:
            repo_id, action = lfs.group("repo"), lfs.group("action")
            if self.command == "POST" and action == "objects/batch":
                return (lambda: self._lfs_batch(repo_id)), False  # the token is checked for uploads only
            if self.command == "POST" and action == "verify":
                return (lambda: self._lfs_verify(repo_id)), True
            oid = action.removeprefix("objects/")
            if self.command == "PUT" and oid != action:
                return (lambda: self._lfs_put(repo_id, oid)), False  # signed URL, as the Hub's presigned ones
            if self.command == "GET" and oid != action:
                return (lambda: self._lfs_get(repo_id, oid)), False
            return None
        match = _WRITE_ROUTE.fullmatch(path)
        if match is None:
            return None
        repo_id, action, rev = match.group("repo"), match.group("action"), unquote(match.group("rev"))
        handlers = {
            ("POST", "preupload"): self._preupload,
            ("POST", "commit"): self._commit,
            ("POST", "tag"): self._create_tag,
            ("DELETE", "tag"): self._delete_tag,
            ("POST", "branch"): self._create_branch,
            ("GET", "xet-write-token"): self._no_xet,
        }
        handler = handlers.get((self.command, action))
        return None if handler is None else ((lambda: handler(repo_id, rev)), True)

    def _check_token(self) -> None:
        token = self.hub.require_token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            self._body()
            raise _Reply(403, "You don't have the rights to write to this repository")

    def _repo(self, repo_id: str) -> GitRepo:
        repo = self.hub.repo(repo_id)
        if repo is None:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        return repo

    # -- write routes --------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            raise _Reply(400, "this test Hub only holds model repositories")
        repo_id = "/".join(p for p in (payload.get("organization"), payload.get("name")) if p)
        if not _REPO_ID.fullmatch(repo_id):
            raise _Reply(400, f"invalid repository name {repo_id!r}")
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub._repo_lock(repo_id):
            if self.hub.repo(repo_id) is not None:
                # The Hub names the existing repo in its 409; create_repo(exist_ok=True) reads that url.
                message = "You already created this model repo"
                self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
                return
            GitRepo.init(self.hub.mirrors / "models" / repo_id)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """Checks the Hub makes on a model card's metadata that a PEFT card can fail."""
        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"\A\s*---\r?\n(.*?)\r?\n---", content, re.S)
        errors = []
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            data, errors = {}, [{"message": f"invalid YAML: {exc}"}]
        if not isinstance(data, dict):
            errors.append({"message": "metadata must be a mapping"})
            data = {}
        bases = data.get("base_model") or []  # '' and null (PEFT writes '' for a model without a name) as absent
        for base in bases if isinstance(bases, list) else [bases]:
            if not _is_repo_id(base):
                errors.append({"message": f'"base_model" must be a Hub model id, got {base!r}'})
        if "license" in data:
            licenses = data["license"] if isinstance(data["license"], list) else [data["license"]]
            for license_id in licenses:
                if license_id not in LICENSES:
                    errors.append({"message": f'"license" must be one of the Hub\'s license ids, got {license_id!r}'})
        if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
            errors.append({"message": '"tags" must be a list of strings'})
        if errors:
            self._send(400, {"errors": errors, "warnings": []})
        else:
            self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        payload = json.loads(self._body() or b"{}")
        head = repo.resolve(rev)
        if head is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        patterns = repo.lfs_patterns(head)
        files = [
            {
                "path": item["path"],
                "uploadMode": "lfs"
                if is_lfs_path(item["path"], patterns) or int(item.get("size") or 0) > LFS_THRESHOLD
                else "regular",
                "shouldIgnore": False,
                "oid": repo.remote_oid(head, item["path"]),
            }
            for item in payload.get("files", [])
        ]
        self._send(200, {"files": files, "commitOid": head})

    def _commit(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        adds: dict[str, bytes] = {}
        lfs_files: dict[str, tuple[str, int]] = {}
        deletes: list[str] = []
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, "only base64 file content is supported")
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                oid, size = value.get("oid", ""), value.get("size")
                if value.get("algo") != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", oid):
                    raise _Reply(400, f"lfsFile {value.get('path')!r}: expected a sha256 oid")
                if not repo.has_lfs_object(oid, size):
                    raise _Reply(422, f"lfsFile {value.get('path')!r}: LFS object {oid} was not uploaded")
                lfs_files[value["path"]] = (oid, repo.lfs_object(oid).stat().st_size)
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            elif key == "copyFile":
                raise _Reply(400, f"{key} is not supported by this test Hub")
        with self.hub._repo_lock(repo_id):
            head = repo.branch_head(branch)
            if head is None:
                raise _Reply(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise _Reply(412, "A commit has happened since. Please refresh and try again.")
            message = "\n\n".join(p for p in (header.get("summary"), header.get("description")) if p) or "commit"
            try:
                oid = repo.commit(branch, head, adds, deletes, message, lfs_files)
            except GitError as exc:  # update-ref lost a race the lock should have prevented
                raise _Reply(412, f"A commit has happened since. Please refresh and try again. ({exc})") from None
            sizes = {p: len(d) for p, d in adds.items()} | dict.fromkeys(lfs_files, 0)
            lfs = {p: sha for p, (sha, _) in lfs_files.items()}
            record = CommitRecord(repo_id, branch, oid, head, sizes, deletes, lfs)
        with self.hub._lock:
            self.hub.state.commits.append(record)
        self._send(
            200,
            {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}"},
        )

    def _create_tag(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        payload = json.loads(self._body() or b"{}")
        tag = payload.get("tag", "")
        commit = repo.resolve(rev)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        with self.hub._repo_lock(repo_id):
            try:
                repo.tag(tag, commit)
            except GitError:
                raise _Reply(409, f"Tag {tag} already exists") from None
        self._send(200, {})

    def _delete_tag(self, repo_id: str, tag: str) -> None:
        repo = self._repo(repo_id)
        self._body()
        with self.hub._repo_lock(repo_id):
            try:
                repo.git("update-ref", "-d", f"refs/tags/{tag}", repo.git("rev-parse", f"refs/tags/{tag}"))
            except GitError:
                raise _Reply(404, f"Tag {tag} not found", "RevisionNotFound") from None
        self._send(200, {})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        payload = json.loads(self._body() or b"{}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise _Reply(404, "Invalid starting point", "RevisionNotFound")
        with self.hub._repo_lock(repo_id):
            try:
                repo.git("update-ref", f"refs/heads/{branch}", start, "0" * 40)
            except GitError:
                raise _Reply(409, f"Branch {branch} already exists") from None
        self._send(200, {})

    # -- Git LFS: the batch API, basic transfer -------------------------------------------------------------

    def _lfs_reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _lfs_batch(self, repo_id: str) -> None:
        """The Git LFS batch API: which objects to PUT (and verify), or where to GET them, for the basic transfer."""
        repo = self._repo(repo_id)
        request = json.loads(self._body() or b"{}")
        operation = request.get("operation")
        if operation == "upload":
            self._check_token()
        elif operation != "download":
            raise _Reply(422, f"unknown LFS operation {operation!r}")
        if "basic" not in request.get("transfers", ["basic"]):
            raise _Reply(422, "this server offers the 'basic' LFS transfer only")
        objects = []
        base = f"{self.hub.endpoint}/{repo_id}.git/info/lfs"
        for item in request.get("objects", []):
            oid, size = str(item.get("oid", "")), item.get("size")
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                entry["error"] = {"code": 422, "message": "invalid object"}
            elif operation == "download":
                if repo.has_lfs_object(oid, size):
                    entry["actions"] = {"download": {"href": f"{base}/objects/{oid}", "header": {}}}
                else:
                    entry["error"] = {"code": 404, "message": "Object does not exist"}
            elif not repo.has_lfs_object(oid, size):  # an object the repo holds needs no action: nothing is sent
                signature = hashlib.sha256(os.urandom(16)).hexdigest()
                with self.hub._lock:
                    self.hub._signed[signature] = (repo_id, oid, size)
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{base}/objects/{oid}?signature={signature}", "header": {}},
                    "verify": {"href": f"{base}/verify", "header": {}},
                }
            objects.append(entry)
        self._lfs_reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, repo_id: str, oid: str) -> None:
        """Receive one object at the URL the batch API signed for it; keep it only if its sha256 and size match."""
        signature = dict(p.split("=", 1) for p in urlsplit(self.path).query.split("&") if "=" in p).get("signature")
        with self.hub._lock:
            signed = self.hub._signed.get(signature or "")
        if signed is None or signed[:2] != (repo_id, oid):
            self._body()
            raise _Reply(403, "upload URL not signed for this object")
        repo = self._repo(repo_id)
        target = repo.lfs_object(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher, size = hashlib.sha256(), 0
        fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in self._body_chunks():
                    hasher.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
            if hasher.hexdigest() != oid or size != signed[2]:
                raise _Reply(400, f"received {size} bytes with sha256 {hasher.hexdigest()}, expected {oid}")
            os.replace(staging, target)  # a concurrent reader sees all or nothing
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
        with self.hub._lock:
            self.hub._signed.pop(signature or "", None)
            self.hub.state.lfs_uploads.append(LfsUpload(repo_id, oid, size))
        self._send(200, {})

    def _lfs_verify(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        request = json.loads(self._body() or b"{}")
        if not repo.has_lfs_object(str(request.get("oid", "")), request.get("size")):
            raise _Reply(404, "Object does not exist")
        self._send(200, {})

    def _lfs_get(self, repo_id: str, oid: str) -> None:
        repo = self._repo(repo_id)
        if not repo.has_lfs_object(oid):
            raise _Reply(404, "Object does not exist")
        data = repo.lfs_object(oid).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _no_xet(self, repo_id: str, rev: str) -> None:
        """This server has no Xet storage (no write token to give): a client must use LFS."""
        raise _Reply(404, "Xet storage is not enabled on this server")

    # -- reads: olah ---------------------------------------------------------------------------------------

    def _proxy(self, path: str) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
        headers["Host"] = f"{HOST}:{self.hub.olah_port}"
        upstream = http.client.HTTPConnection(HOST, self.hub.olah_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, upstream_headers = response.status, response.getheaders()
        finally:
            upstream.close()
        fault = self.hub._take_fault(self.command, path, ("drop", "corrupt")) if data else None
        if fault is not None and fault.kind == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        self.send_response(status)
        length = str(len(data))
        for key, value in upstream_headers:
            if key.lower() == "content-length" and self.command == "HEAD":
                length = value
            elif key.lower() not in _HOP_BY_HOP and key.lower() not in ("date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)


@contextlib.contextmanager
def running_hub(root: Path) -> Iterator[HubServer]:
    """A started :class:`HubServer` under ``root``, stopped (olah with SIGTERM) on exit."""
    hub = HubServer(root)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
