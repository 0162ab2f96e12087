"""The built-in remote (file://, bare paths, memory://, s3://) against real back ends.

S3 is moto's server on 127.0.0.1 (tests/s3_server.py), reached through s3fs and configured the way
a user would: environment variables only (``AWS_ENDPOINT_URL`` and friends). What was uploaded is
asserted from the remote's side (the server's request log, the files' inodes, the memory objects),
never from adapterkit's own counters alone. Faults are real: bytes changed on the remote or in
flight, a body cut off mid-stream, a server that goes away mid-pull, two pushes racing for a ref.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapterkit import Store
from adapterkit.errors import (
    IntegrityError,
    InvalidReferenceError,
    ReferenceNotFoundError,
    RemoteConflictError,
    SyncError,
)
from adapterkit.plugins import Plugins
from adapterkit.remotes.base import Remote, TransferResult
from adapterkit.remotes.fsspec import FsspecRemote
from adapterkit.sync import open_remote, push

try:
    from s3_server import Fault, S3TestServer
except ImportError:  # no moto: the s3 cases skip (in the s3_server fixture), the others still run
    Fault = S3TestServer = None  # type: ignore[assignment,misc]

BUCKET = "adapterkit-test"
REF = "org/model:v1"
KINDS = ["file", "bare", "memory", "s3"]


# -- fixtures -----------------------------------------------------------------------------------------


def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp: Path, endpoint: str) -> None:
    """Point boto at ``endpoint`` through the environment only, isolated from any real AWS set-up."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a dead server fails now, not after botocore's back-off


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import boto3

    server = S3TestServer()
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3TestServer]:
    _aws_env(monkeypatch, tmp_path, s3_server.endpoint)
    s3_server.faults.clear()
    yield s3_server
    s3_server.faults.clear()


def _boto() -> Any:
    import boto3

    return boto3.client("s3")  # configured by the environment, like the remote under test


@dataclass
class RemoteRoot:
    """A fresh remote store root of one kind, and direct access to its objects (to damage or inspect them)."""

    kind: str
    url: str
    path: Path | None = None
    server: S3TestServer | None = None
    prefix: str = ""

    def _memory(self) -> Any:
        import fsspec

        return fsspec.filesystem("memory")

    def objects(self) -> set[str]:
        """Every object key under the root, relative to it."""
        if self.path is not None:
            if not self.path.exists():
                return set()
            return {p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()}
        if self.kind == "memory":
            top = f"/{self.prefix}/"
            return {k[len(top) :] for k in self._memory().store if k.startswith(top)}
        pages = _boto().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return {obj["Key"][len(self.prefix) + 1 :] for page in pages for obj in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        if self.path is not None:
            return (self.path / key).read_bytes()
        if self.kind == "memory":
            return self._memory().cat_file(f"/{self.prefix}/{key}")
        return _boto().get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        """Replace an object's bytes behind adapterkit's back."""
        if self.path is not None:
            target = self.path / key
            if target.exists():
                target.chmod(0o644)
            target.write_bytes(data)
        elif self.kind == "memory":
            self._memory().pipe_file(f"/{self.prefix}/{key}", data)
        else:
            _boto().put_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}", Body=data)

    def delete(self, key: str) -> None:
        if self.path is not None:
            (self.path / key).unlink()
        elif self.kind == "memory":
            self._memory().rm_file(f"/{self.prefix}/{key}")
        else:
            _boto().delete_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")

    def watch(self) -> Callable[[], list[str]]:
        """Start watching; the returned function lists what was written to the remote since.

        s3: the server's own request log. file: each object's inode, mtime and size. memory:
        the identity of each stored object (every write makes a new one).
        """
        server, root = self.server, self.path
        if server is not None:
            mark = server.mark()
            return lambda: [f"{r.method} {r.path}" for r in server.writes(mark)]
        if root is not None:

            def state() -> dict[str, object]:
                return {
                    p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
                    for top in ("blobs", "manifests", "refs", "logs")
                    for p in (root / top).rglob("*")
                    if p.is_file()
                }

        else:
            memory, top = self._memory().store, f"/{self.prefix}/"

            def state() -> dict[str, object]:
                return {k: id(v) for k, v in memory.items() if k.startswith(top)}

        before = state()

        def changed() -> list[str]:
            after = state()
            return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

        return changed


def _root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> RemoteRoot:
    name = f"ak-{uuid.uuid4().hex[:12]}"
    if kind == "file":
        return RemoteRoot(kind, f"file://{tmp_path / 'remote'}", path=tmp_path / "remote")
    if kind == "bare":
        return RemoteRoot(kind, str(tmp_path / "remote"), path=tmp_path / "remote")
    if kind == "memory":
        return RemoteRoot(kind, f"memory://{name}", prefix=name)
    server = request.getfixturevalue("s3")
    return RemoteRoot(kind, f"s3://{BUCKET}/{name}", server=server, prefix=name)


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> RemoteRoot:
    return _root(request.param, tmp_path, request)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    return Store(tmp_path / "a"), Store(tmp_path / "b")


@pytest.fixture
def adapter(stores: tuple[Store, Store], make_adapter: Callable[..., Path]) -> str:
    """An adapter in store A as org/model:v1; its digest."""
    return stores[0].add(make_adapter("model", seed=1), REF).digest


def pull(store: Store, source: str, tag: str | None = None, **kwargs: Any) -> TransferResult:
    """Pull through the plugin registry, as ``adapterkit pull`` does."""
    return open_remote(source).pull(store, source, tag, **kwargs)


def total_size(store: Store, digest: str) -> int:
    config, layers = store.manifest(digest)
    manifest = store.manifests.path(digest).stat().st_size
    return config.size + sum(layer.size for layer in {layer.digest: layer for layer in layers}.values()) + manifest


def weights_key(store: Store, digest: str) -> tuple[str, str]:
    """(remote key, digest) of the adapter's weights blob."""
    _, layers = store.manifest(digest)
    blob = next(layer for layer in layers if layer.title == "adapter_model.safetensors")
    hexdigest = blob.digest.removeprefix("sha256:")
    return f"blobs/sha256/{hexdigest[:2]}/{hexdigest[2:]}", blob.digest


def assert_untouched(store: Store, digest: str) -> None:
    """A failed pull left no ref, nothing damaged, and not the adapter's manifest."""
    assert store.refs_by_digest() == {}
    assert not store.manifests.exists(digest)
    report = store.verify(full=True)
    assert report.ok, report.problems


# -- round trips ----------------------------------------------------------------------------------------


def test_round_trip_sends_only_what_is_missing(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    size = total_size(a, adapter)

    first = push(a, REF, remote.url)
    assert first == TransferResult(adapter, f"{remote.url}/{REF}", transferred_bytes=size, skipped_bytes=0)
    assert remote.read("refs/org/model/_tags/v1") == f"{adapter}\n".encode()

    changed = remote.watch()
    again = push(a, REF, remote.url)
    assert (again.transferred_bytes, again.skipped_bytes) == (0, size)
    assert changed() == []  # the remote saw no write at all: no blob, no manifest, no ref

    got = pull(b, f"{remote.url}/{REF}")
    assert got == TransferResult(adapter, REF, transferred_bytes=size, skipped_bytes=0)
    assert b.resolve(REF) == adapter
    assert b.show(REF)["files"] == a.show(REF)["files"]
    assert b.verify(full=True).ok
    assert pull(b, f"{remote.url}/{REF}").transferred_bytes == 0


def test_pushed_remote_has_the_store_layout(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, _ = stores
    push(a, REF, remote.url)
    keys = {k for k in remote.objects() if not k.startswith(("locks/", "logs/", "tmp/"))}
    expected = {"store.json", "refs/org/model/_tags/v1", f"manifests/sha256/{adapter[7:9]}/{adapter[9:]}"}
    config, layers = a.manifest(adapter)
    expected |= {f"blobs/sha256/{x.digest[7:9]}/{x.digest[9:]}" for x in (config, *layers)}
    assert keys == expected
    assert remote.read("store.json") == b'{"format":"adapterkit-store","version":1}\n'
    if remote.path is not None:  # a file remote is a store in its own right, reflog included
        there = Store(remote.path)
        assert there.resolve(REF) == adapter and there.verify(full=True).ok
        assert [e["new"] for e in there.reflog(REF)] == [adapter]


def test_pull_a_pinned_digest(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    push(a, REF, remote.url)
    got = pull(b, f"{remote.url}/org/model@{adapter}")
    assert (got.digest, got.ref) == (adapter, f"org/model:sha256-{adapter[7:19]}")
    assert pull(b, f"{remote.url}/org/model@{adapter}", "mine:pinned").ref == "mine:pinned"
    assert b.resolve("mine:pinned") == adapter
    missing = "sha256:" + "0" * 64
    with pytest.raises(ReferenceNotFoundError, match=f"no adapter org/model@{missing} on"):
        pull(b, f"{remote.url}/org/model@{missing}")


def test_a_digest_prefix_cannot_be_pulled(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    push(a, REF, remote.url)
    with pytest.raises(InvalidReferenceError, match=r"a digest prefix cannot be pulled; give NAME\[:TAG\] or NAME@"):
        pull(b, f"{remote.url}/{adapter[:19]}")
    assert pull(b, f"{remote.url}/{adapter}", "org/model:pinned").digest == adapter  # the whole digest works


def test_pull_a_missing_name_is_a_clear_error(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    push(a, REF, remote.url)
    with pytest.raises(ReferenceNotFoundError, match=rf"no adapter org/other:v1 on {remote.url}$"):
        pull(b, f"{remote.url}/org/other:v1")
    with pytest.raises(ReferenceNotFoundError, match="no adapter org/model:latest on"):
        pull(b, f"{remote.url}/org/model")
    with pytest.raises(SyncError, match="is a store; name an adapter in it"):
        pull(b, remote.url)
    assert not b.root.exists()  # nothing was created locally


# -- URL rules --------------------------------------------------------------------------------------------


def test_push_destinations(tmp_path: Path, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    root = tmp_path / "srv"
    assert push(a, REF, str(root)).ref == f"{root}/{REF}"  # a new store, the ref keeps its name

    renamed = push(a, REF, f"file://{root}/team/renamed:prod")  # DEST/NAME:TAG inside an existing store
    assert renamed.ref == f"file://{root}/team/renamed:prod" and renamed.transferred_bytes == 0
    assert Store(root).resolve("team/renamed:prod") == adapter

    with pytest.raises(SyncError, match="publishes into an existing store"):
        push(a, REF, str(tmp_path / "nowhere" / "x:v1"))
    with pytest.raises(SyncError, match=f"is inside the adapterkit store {root}"):
        push(a, REF, str(root / "team" / "renamed"))
    with pytest.raises(InvalidReferenceError, match="not to a digest"):
        push(a, REF, f"{root}/org/model@{adapter}")
    with pytest.raises(InvalidReferenceError, match="invalid adapter name"):
        push(a, REF, f"{root}/Bad Name:v1")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SyncError, match="not empty and is not an adapterkit store"):
        push(a, REF, str(foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    with pytest.raises(SyncError, match="no adapterkit store at or above"):
        pull(b, str(tmp_path / "nowhere" / "x:v1"))
    with pytest.raises(InvalidReferenceError, match="NAME@sha256:<64 hex digits>"):
        pull(b, f"{root}/sha256:{adapter[7:15]}")
    with pytest.raises(SyncError, match="not a host"):
        FsspecRemote("file://server/srv/ak")
    with pytest.raises(SyncError, match=r"'\.\.' are not allowed"):
        FsspecRemote("s3://bucket/a/../b")
    with pytest.raises(SyncError, match="name a bucket"):
        FsspecRemote("s3://")
    assert pull(b, f"{root}/sha256:{adapter[7:]}", "x:y").digest == adapter  # a bare digest, with a local tag
    with pytest.raises(InvalidReferenceError, match="needs a local --tag"):
        pull(b, f"{root}/{adapter}")


def test_new_s3_store_needs_an_empty_prefix(s3: S3TestServer, stores: tuple[Store, Store], adapter: str) -> None:
    a, _ = stores
    prefix = f"busy-{uuid.uuid4().hex[:8]}"
    _boto().put_object(Bucket=BUCKET, Key=f"{prefix}/data.csv", Body=b"1,2\n")
    with pytest.raises(SyncError, match="not empty and is not an adapterkit store"):
        push(a, REF, f"s3://{BUCKET}/{prefix}")
    with pytest.raises(SyncError, match=r"NoSuchBucket|does not exist"):
        push(a, REF, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ak")


def test_builtin_schemes_are_registered_like_plugins(tmp_path: Path) -> None:
    plugins = Plugins(entry_points=False)
    owners = plugins.remote_owners()
    assert {s: owners[s] for s in ("file", "s3", "memory")} == dict.fromkeys(
        ("file", "s3", "memory"), "adapterkit.default_plugins"
    )
    for url in (str(tmp_path), f"file://{tmp_path}", "memory://x", "s3://bucket/prefix"):
        remote = open_remote(url, plugins=plugins)
        assert isinstance(remote, FsspecRemote) and isinstance(remote, Remote) and remote.url == url


def test_s3_needs_s3fs(monkeypatch: pytest.MonkeyPatch, stores: tuple[Store, Store], adapter: str) -> None:
    monkeypatch.setitem(__import__("sys").modules, "s3fs", None)
    with pytest.raises(SyncError, match=r"install 'adapterkit\[s3\]'"):
        push(stores[0], REF, "s3://bucket/ak")


def test_s3_endpoint_from_the_service_specific_variable(
    s3: S3TestServer, monkeypatch: pytest.MonkeyPatch, stores: tuple[Store, Store], adapter: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)  # botocore prefers the service's own variable
    url = f"s3://{BUCKET}/ak-{uuid.uuid4().hex[:8]}"
    assert push(stores[0], REF, url).digest == adapter


# -- damage -------------------------------------------------------------------------------------------------


def test_a_corrupt_remote_blob_is_refused_and_a_rerun_recovers(
    remote: RemoteRoot, stores: tuple[Store, Store], adapter: str
) -> None:
    a, b = stores
    push(a, REF, remote.url)
    key, blob = weights_key(a, adapter)
    good = remote.read(key)
    remote.write(key, bytes([good[0] ^ 1]) + good[1:])  # same size, one bit off

    with pytest.raises(SyncError, match=f"{blob} arrived as {len(good)} bytes hashing to sha256:.*corrupt"):
        pull(b, f"{remote.url}/{REF}")
    assert_untouched(b, adapter)
    assert not b.blobs.exists(blob)

    remote.write(key, good[:100])  # truncated
    with pytest.raises(SyncError, match=f"{blob} arrived as 100 bytes"):
        pull(b, f"{remote.url}/{REF}")
    assert_untouched(b, adapter)

    remote.delete(key)
    with pytest.raises(SyncError, match=f"blob {blob} is missing from the remote store"):
        pull(b, f"{remote.url}/{REF}")
    assert_untouched(b, adapter)

    remote.write(key, good)
    assert pull(b, f"{remote.url}/{REF}").digest == adapter
    assert b.verify(full=True).ok


def test_a_corrupt_remote_manifest_is_refused(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    push(a, REF, remote.url)
    key = f"manifests/sha256/{adapter[7:9]}/{adapter[9:]}"
    good = remote.read(key)
    remote.write(key, good.replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    with pytest.raises(SyncError, match=r"the manifest of .* hashes to sha256:.*corrupt"):
        pull(b, f"{remote.url}/{REF}")
    assert not b.root.exists() or b.refs_by_digest() == {}


@pytest.mark.parametrize("kind", ["memory", "s3"])  # file:// remotes read refs as a local store does
def test_a_corrupt_remote_ref_names_the_file_to_repair(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, stores: tuple[Store, Store], adapter: str
) -> None:
    remote = _root(kind, tmp_path, request)
    a, b = stores
    push(a, REF, remote.url)
    key = "refs/org/model/_tags/v1"
    remote.write(key, b"not a digest\n")
    expected = (
        f"{remote.url}/{REF}: corrupt ref ({remote.url}/{key} does not hold a sha256 digest); "
        "delete that file and push the adapter again, or write the right sha256:<64 hex digits> into it"
    )
    for attempt in (lambda: pull(b, f"{remote.url}/{REF}"), lambda: push(a, REF, remote.url)):
        with pytest.raises(SyncError) as info:
            attempt()
        assert str(info.value) == expected
    assert remote.read(key) == b"not a digest\n"  # left for the user to repair
    remote.delete(key)  # the remedy the message gives
    push(a, REF, remote.url)
    assert pull(b, f"{remote.url}/{REF}").digest == adapter


def test_push_repairs_a_wrong_sized_remote_blob(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    push(a, REF, remote.url)
    key, _ = weights_key(a, adapter)
    good = remote.read(key)
    remote.write(key, good[:10])
    again = push(a, REF, remote.url)
    assert again.transferred_bytes == len(good)
    assert remote.read(key) == good
    assert pull(b, f"{remote.url}/{REF}").digest == adapter


def test_a_damaged_local_blob_is_never_pushed(remote: RemoteRoot, stores: tuple[Store, Store], adapter: str) -> None:
    a, _ = stores
    _, blob = weights_key(a, adapter)
    path = a.blobs.path(blob)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(IntegrityError, match=f"local object {blob} is corrupt"):
        push(a, REF, remote.url)
    assert not any(blob[7:9] + "/" + blob[9:] in k for k in remote.objects())
    assert "refs/org/model/_tags/v1" not in remote.objects()


@pytest.mark.parametrize(
    ("strip", "caught_by"),
    [(False, "FlexibleChecksumError"), (True, "arrived as .* hashing to .* corrupt")],
    ids=["botocore-crc", "adapterkit-sha256"],
)
def test_s3_bytes_corrupted_in_flight(
    s3: S3TestServer, stores: tuple[Store, Store], adapter: str, strip: bool, caught_by: str
) -> None:
    """With S3's stored checksum in the response botocore notices first; without it, the sha256 check does."""
    a, b = stores
    url = f"s3://{BUCKET}/ak-{uuid.uuid4().hex[:8]}"
    push(a, REF, url)
    key, blob = weights_key(a, adapter)
    s3.faults.append(Fault(key, "corrupt", times=1, strip_checksums=strip))  # one bad body, then good ones
    with pytest.raises(SyncError, match=f"{blob[9:]}.*{caught_by}"):
        pull(b, f"{url}/{REF}")
    assert_untouched(b, adapter)
    assert pull(b, f"{url}/{REF}").digest == adapter


def test_s3_connection_dropped_mid_body(s3: S3TestServer, stores: tuple[Store, Store], adapter: str) -> None:
    a, b = stores
    url = f"s3://{BUCKET}/ak-{uuid.uuid4().hex[:8]}"
    push(a, REF, url)
    key, blob = weights_key(a, adapter)
    s3.faults.append(Fault(key, "drop", times=1))
    with pytest.raises(SyncError, match=f"{url}: reading {key} failed"):
        pull(b, f"{url}/{REF}")
    assert_untouched(b, adapter)
    assert not b.blobs.exists(blob)
    assert not list((b.root / "tmp").iterdir())  # the half-received blob's temp file is gone too
    again = pull(b, f"{url}/{REF}")
    assert again.digest == adapter and again.skipped_bytes > 0  # blobs that had arrived are reused
    assert b.verify(full=True).ok


def test_s3_server_gone_mid_pull(
    s3: S3TestServer, monkeypatch: pytest.MonkeyPatch, stores: tuple[Store, Store], adapter: str
) -> None:
    """The first chunk arrives, then the server is gone: the next request cannot connect."""
    a, b = stores
    url = f"s3://{BUCKET}/ak-{uuid.uuid4().hex[:8]}"
    push(a, REF, url)
    flaky = S3TestServer()  # a second server on the same (in-process) moto data
    flaky.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint)

    stopped: list[bool] = []

    def stop_after_first_chunk(_n: int) -> None:
        if not stopped:
            stopped.append(True)
            flaky.stop()

    try:
        with pytest.raises(SyncError, match=r"failed .*Could not connect"):
            pull(b, f"{url}/{REF}", progress=stop_after_first_chunk)
    finally:
        if not stopped:
            flaky.stop()
    assert_untouched(b, adapter)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert pull(b, f"{url}/{REF}").digest == adapter
    assert b.verify(full=True).ok


# -- races ----------------------------------------------------------------------------------------------------


def test_a_push_that_loses_the_race_gets_a_conflict(
    remote: RemoteRoot, tmp_path: Path, make_adapter: Callable[..., Path]
) -> None:
    """Push B runs to completion in the middle of push A (after A read the remote ref): A must not win.

    B is `adapterkit push` in a process of its own, except on memory://, which no other process can see.
    """
    a, c, b = Store(tmp_path / "a"), Store(tmp_path / "c"), Store(tmp_path / "b")
    first = a.add(make_adapter("first", seed=1), REF).digest
    second = c.add(make_adapter("second", seed=2), REF).digest
    raced: list[str] = []

    def race(_n: int) -> None:
        if raced:
            return
        if remote.kind == "memory":
            raced.append(push(c, REF, remote.url).digest)
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONWARNINGS": "ignore"}
        other = subprocess.run(
            [sys.executable, "-m", "adapterkit", "--store", str(c.root), "push", REF, remote.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert other.returncode == 0 and other.stderr == "", other.stderr
        raced.append(other.stdout.split()[1])  # "pushed DIGEST to ..."

    with pytest.raises(RemoteConflictError, match=f"moved to {second} while this push ran"):
        push(a, REF, remote.url, progress=race)
    assert raced == [second]
    assert remote.read("refs/org/model/_tags/v1") == f"{second}\n".encode()
    assert pull(b, f"{remote.url}/{REF}").digest == second
    assert b.verify(full=True).ok

    # pushing again reads the new value, and wins
    assert push(a, REF, remote.url).digest == first
    assert remote.read("refs/org/model/_tags/v1") == f"{first}\n".encode()


#: A push in a process of its own: ready (adapterkit imported, store opened), it waits for the go file, pushes,
#: and prints the outcome as JSON; anything but a win or a RemoteConflictError is a traceback and exit 1.
_PUSH_ON_GO = """
import json, os, sys, time
from adapterkit.errors import RemoteConflictError
from adapterkit import Store
from adapterkit.sync import push
root, ref, url, ready, go = sys.argv[1:6]
store = Store(root)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    print(json.dumps({"won": push(store, ref, url).digest}))
except RemoteConflictError as exc:
    print(json.dumps({"conflict": str(exc)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_concurrent_pushes_leave_one_consistent_winner(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, make_adapter: Callable[..., Path]
) -> None:
    """Six pushes of different adapters to one ref, each in its own process, released at the same moment."""
    remote = _root(kind, tmp_path, request)
    pushers = []
    for i in range(6):
        store = Store(tmp_path / f"s{i}")
        pushers.append((store, store.add(make_adapter(f"m{i}", seed=10 + i), REF).digest))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = []
    for i, (store, _) in enumerate(pushers):
        ready = tmp_path / f"ready{i}"
        command = [sys.executable, "-c", _PUSH_ON_GO, str(store.root), REF, remote.url, str(ready), str(go)]
        processes.append((ready, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)))
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready, _ in processes):
        assert time.monotonic() < deadline and all(p.poll() is None for _, p in processes), "a pusher did not start"
        time.sleep(0.01)
    go.touch()
    outcomes = []
    for _, process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
        outcomes.append(json.loads(out))
    won = {o["won"] for o in outcomes if "won" in o}
    lost = [o["conflict"] for o in outcomes if "conflict" in o]
    print(f"{kind}: {len(won)} of {len(outcomes)} concurrent pushes won, {len(lost)} got a conflict")
    assert won and len(won) + len(lost) == len(pushers)
    # Released together, the pushes read the ref before any of them moves it: without the compare-and-swap
    # every one would "win" (the last write silently replacing the others); with it, the late ones are told.
    assert lost and all("while this push ran" in message for message in lost), outcomes
    final = remote.read("refs/org/model/_tags/v1").decode().strip()
    assert final in won
    b = Store(tmp_path / "b")
    assert pull(b, f"{remote.url}/{REF}").digest == final
    assert b.verify(full=True).ok


def test_s3_multipart_upload_for_large_blobs(
    s3: S3TestServer, monkeypatch: pytest.MonkeyPatch, stores: tuple[Store, Store], make_adapter: Callable[..., Path]
) -> None:
    import adapterkit.remotes.fsspec.s3 as module

    monkeypatch.setattr(module, "PART", 5 << 20)  # S3's smallest part
    a, b = stores
    digest = a.add(make_adapter("big", seed=3, modules=8, r=16, dim=6144, readme=None), REF).digest
    url = f"s3://{BUCKET}/ak-{uuid.uuid4().hex[:8]}"
    mark = s3.mark()
    seen: list[int] = []
    push(a, REF, url, progress=seen.append)
    key, _ = weights_key(a, digest)
    parts = [w for w in s3.writes(mark) if key in w.path]
    assert [w.method for w in parts] == ["POST", "PUT", "PUT", "POST"]  # create, 2 parts, complete
    assert sum(seen) == total_size(a, digest) and max(seen) == 5 << 20
    assert push(a, REF, url).transferred_bytes == 0
    assert pull(b, f"{url}/{REF}").digest == digest
    assert b.verify(full=True).ok
