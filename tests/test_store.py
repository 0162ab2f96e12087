"""The store's API and CLI: add, resolve, tag, rm, export, get, reflog, corruption, bad input, full disk, gc."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterkit import Store
from adapterkit.adapter.config import canonical_config
from adapterkit.base_model import fingerprint
from adapterkit.errors import (
    AdapterFormatError,
    AdapterkitError,
    AmbiguousReferenceError,
    BaseModelError,
    IntegrityError,
    InvalidInputError,
    InvalidReferenceError,
    ReferenceNotFoundError,
    StoreError,
    StoreLockedError,
    UnsupportedAdapterError,
)
from adapterkit.files import fsutil
from adapterkit.files.safetensors import serialize
from adapterkit.formats.peft import read_adapter
from adapterkit.store import gc as gc_module
from adapterkit.store.documents import canonical_json

CLI = [sys.executable, "-m", "adapterkit.cli"]
Snapshot = Callable[[Path], dict[str, str]]


def run_cli(store: Store | Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = store.root if isinstance(store, Store) else store
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*CLI, "--store", str(root), *args], capture_output=True, text=True, timeout=120, env=env)


def assert_cli_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1, and stderr is exactly one line, starting with "Error:" and containing ``needles``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text


def object_files(store: Store) -> set[str]:
    """Relative paths of every file under blobs/ and manifests/."""
    out = set()
    for top in (store.blobs.root, store.manifests.root):
        if top.is_dir():
            out |= {p.relative_to(store.root).as_posix() for p in top.rglob("*") if p.is_file()}
    return out


def assert_objects_hash_to_names(store: Store) -> None:
    for top in (store.blobs.root, store.manifests.root):
        for path in top.rglob("*") if top.is_dir() else ():
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert digest == path.parent.name + path.name, f"{path} holds bytes hashing to {digest}"


def assert_same_adapter(loaded: Any, folder: Path) -> None:
    original = read_adapter(folder)
    assert loaded.config == original.config
    got, want = loaded.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def layers_of(store: Store, digest: str) -> dict[str, str]:
    _, layers = store.manifest(digest)
    return {layer.title: layer.digest for layer in layers}


def shift_reflogs(store: Store, seconds: float) -> None:
    """Make every reflog entry ``seconds`` older (the on-disk format: ``old new time message``)."""
    for path in store.refs.logs.rglob("*"):
        if path.is_file():
            lines = []
            for line in path.read_text("utf-8").splitlines():
                old, new, stamp, *rest = line.split(" ", 3)
                lines.append(" ".join([old, new, f"{float(stamp) - seconds:.6f}", *rest]))
            path.write_text("\n".join(lines) + "\n", "utf-8")


def age_objects(store: Store, seconds: float) -> None:
    """Set the mtime of every object and temp file ``seconds`` into the past."""
    when = time.time() - seconds
    for top in (store.blobs.root, store.manifests.root, store.tmp):
        for path in top.rglob("*") if top.is_dir() else ():
            if path.is_file():
                os.utime(path, (when, when))


# -- 1. API basics -----------------------------------------------------------------------------------------------------


def test_add_stores_canonical_objects_and_readd_writes_nothing(store: Store, peft_folders: Any) -> None:
    first = store.add(peft_folders.lora, "llama/chat:v1")
    assert first.digest.startswith("sha256:") and first.ref == "llama/chat:v1"
    assert first.new_bytes > 0 and first.info["digest"] == first.digest and first.info["refs"] == ["llama/chat:v1"]
    files = layers_of(store, first.digest)
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert_objects_hash_to_names(store)
    for path in store.blobs.root.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o222 == 0, f"{path} is writable"
    blobs_before = object_files(store)

    again = store.add(peft_folders.lora, "llama/chat:v1")
    other_tag = store.add(peft_folders.lora, "other")
    assert again.digest == other_tag.digest == first.digest
    assert again.new_bytes == 0 and other_tag.new_bytes == 0
    assert object_files(store) == blobs_before
    assert not any(store.tmp.iterdir())
    assert store.resolve("other") == store.resolve("other:latest") == first.digest


def test_same_tensors_give_the_same_digest_from_bin_safetensors_and_export(
    store: Store, peft_folders: Any, tmp_path: Path
) -> None:
    digest = store.add(peft_folders.lora, "st").digest
    assert store.add(peft_folders.lora_bin, "bin").digest == digest
    store.export("st", tmp_path / "exported")
    assert store.add(tmp_path / "exported", "roundtrip").digest == digest
    assert store.add(peft_folders.lora2, "different").digest != digest


def test_add_with_base_records_fingerprint(store: Store, peft_folders: Any) -> None:
    plain = store.add(peft_folders.lora, "plain")
    based = store.add(peft_folders.lora, "based", base=peft_folders.base)
    assert (plain.info["base_model"] or {}).get("structure_digest") is None
    assert based.info["base_model"]["structure_digest"] == fingerprint(peft_folders.base).structure_digest
    assert based.digest != plain.digest
    # the base is metadata only: the weights blob is shared, and the second add wrote no weights again
    assert layers_of(store, based.digest) == layers_of(store, plain.digest)
    assert store.add(peft_folders.lora, "based2", base=peft_folders.base).digest == based.digest


def _headers_only_base(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    path.mkdir(parents=True)
    raw = {name: ("F32", shape, bytes(4 * shape[0] * shape[1])) for name, shape in tensors.items()}
    (path / "model.safetensors").write_bytes(serialize(raw))
    return path


def test_add_with_mismatched_base_is_refused_and_store_unchanged(
    store: Store, peft_folders: Any, tmp_path: Path, snapshot: Snapshot
) -> None:
    store.add(peft_folders.lora2, "existing")
    before = snapshot(store.root)
    # wrong shapes: the same architecture with hidden size 48
    with pytest.raises(BaseModelError, match=r"is \[48, 48\] but adapter module") as wrong_shape:
        store.add(peft_folders.lora, "x", base=peft_folders.other_base)
    # missing module: a base that has attention weights but no MLP
    attn_only = _headers_only_base(
        tmp_path / "attn_only",
        {f"model.layers.{i}.self_attn.{p}_proj.weight": (32, 32) for i in range(2) for p in "qv"},
    )
    with pytest.raises(BaseModelError, match="has no weight for adapter module") as missing:
        store.add(peft_folders.lora_mlp, "y", base=attn_only)
    with pytest.raises(BaseModelError):
        store.add(peft_folders.lora, "z", base=tmp_path / "no-such-base")
    for exc in (wrong_shape.value, missing.value):
        assert_one_line(exc)
    assert snapshot(store.root) == before
    assert_cli_error(run_cli(store, "add", str(peft_folders.lora), "--tag", "x", "--base", str(attn_only)), "base")
    assert snapshot(store.root) == before


def test_tag_and_rm_touch_only_refs(store: Store, peft_folders: Any, snapshot: Snapshot) -> None:
    digest = store.add(peft_folders.lora, "a").digest
    objects = object_files(store)
    assert store.tag("a", "b:v2") == digest
    assert store.resolve("b:v2") == digest
    assert store.refs_by_digest()[digest] == ["a:latest", "b:v2"]
    assert store.remove("a") == digest
    assert store.remove("b:v2") == digest
    with pytest.raises(ReferenceNotFoundError):
        store.resolve("a")
    assert object_files(store) == objects  # rm removes the ref only; gc decides about the data
    assert store.resolve(digest) == digest
    assert store.list() == []
    before = snapshot(store.root)
    with pytest.raises(ReferenceNotFoundError):
        store.remove("a")
    with pytest.raises(InvalidReferenceError):
        store.remove(digest)
    with pytest.raises(ReferenceNotFoundError):
        store.tag("nope", "c")
    with pytest.raises(InvalidReferenceError):
        store.tag(digest, f"c@{digest}")
    assert snapshot(store.root) == before
    assert_cli_error(run_cli(store, "rm", "a"), "no ref a:latest")


def _manifest_with_prefix(store: Store, digest: str, hex_digits: int) -> str:
    """Store another valid manifest whose digest shares ``hex_digits`` leading hex digits with ``digest``."""
    document = json.loads(store.manifests.path(digest).read_bytes())
    want = digest.removeprefix("sha256:")[:hex_digits]
    for i in range(5_000_000):
        document["annotations"] = {"n": str(i)}
        data = canonical_json(document)
        if hashlib.sha256(data).hexdigest().startswith(want):
            return store.manifests.put_bytes(data).digest
    raise AssertionError("no prefix twin found")


def test_resolve_every_reference_form(store: Store, peft_folders: Any) -> None:
    digest = store.add(peft_folders.lora, "team/llama-chat:v1.0").digest
    hexd = digest.removeprefix("sha256:")
    assert store.resolve("team/llama-chat:v1.0") == digest
    assert store.resolve(f"team/llama-chat@{digest}") == digest
    assert store.resolve(digest) == digest
    assert store.resolve(hexd[:4]) == digest
    assert store.resolve(f"sha256:{hexd[:10]}") == digest
    assert store.resolve(hexd) == digest
    twin = _manifest_with_prefix(store, digest, 4)
    assert twin != digest and store.verify().ok
    with pytest.raises(AmbiguousReferenceError, match="matches 2 adapters") as ambiguous:
        store.resolve(hexd[:4])
    assert_one_line(ambiguous.value)
    longer = next(n for n in range(5, 65) if twin.removeprefix("sha256:")[:n] != hexd[:n])
    assert store.resolve(hexd[:longer]) == digest
    assert store.resolve(twin.removeprefix("sha256:")[:longer]) == twin
    for missing in ("team/llama-chat:v2", "ffff" if not hexd.startswith("ffff") else "0000", f"sha256:{'0' * 64}"):
        with pytest.raises(ReferenceNotFoundError):
            store.resolve(missing)
    with pytest.raises(InvalidReferenceError):
        store.resolve("sha256:abc")  # fewer than 4 hex digits
    assert_cli_error(run_cli(store, "show", hexd[:4]), "matches 2 adapters")


def test_export_is_byte_identical_and_refuses_non_empty_dirs(
    store: Store, peft_folders: Any, tmp_path: Path, snapshot: Snapshot
) -> None:
    digest = store.add(peft_folders.lora, "a").digest
    out = store.export("a", tmp_path / "out").path
    for title, blob in layers_of(store, digest).items():
        assert (out / title).read_bytes() == store.blobs.path(blob).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(layers_of(store, digest))
    empty = tmp_path / "empty"
    empty.mkdir()
    store.export(digest, empty)
    assert (empty / "adapter_model.safetensors").is_file()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    before = snapshot(tmp_path / "busy")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        store.export("a", busy)
    assert snapshot(busy) == before
    assert_cli_error(run_cli(store, "export", "a", str(busy)), "not an empty directory")
    assert snapshot(busy) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_get_returns_the_adapter_that_went_in(store: Store, peft_folders: Any) -> None:
    for folder, ref in ((peft_folders.lora, "a"), (peft_folders.lora2, "b"), (peft_folders.lora_bin, "c")):
        digest = store.add(folder, ref).digest
        adapter = store.get(ref)
        assert adapter.digest == digest and adapter.metadata is not None
        assert_same_adapter(adapter, folder)


def test_reflog_records_every_change(store: Store, peft_folders: Any) -> None:
    one = store.add(peft_folders.lora, "x:t", base=None).digest
    store.add(peft_folders.lora, "x:t")  # no change, no entry
    two = store.add(peft_folders.lora2, "x:t").digest
    store.tag(one, "x:t")
    store.remove("x:t")
    entries = store.reflog("x:t")
    assert [(e["old"], e["new"]) for e in entries] == [(None, one), (one, two), (two, one), (one, None)]
    assert [e["message"].split(" ")[0] for e in entries] == ["add", "add", "tag", "rm"]
    assert all(a["time"] <= b["time"] for a, b in itertools.pairwise(entries))
    assert store.reflog("never:used") == []


def test_reflog_survives_a_torn_line(store: Store, peft_folders: Any) -> None:
    one = store.add(peft_folders.lora, "x").digest
    log = store.refs.logs / "x" / "_tags" / "latest"
    with log.open("a") as fh:
        fh.write(f"{one} sha256:{'1' * 30}")  # a writer killed mid-line
    two = store.add(peft_folders.lora2, "x").digest
    assert [(e["old"], e["new"]) for e in store.reflog("x")][-1] == (one, two)


def test_store_format_marker(tmp_path: Path, peft_folders: Any, snapshot: Snapshot) -> None:
    root = tmp_path / "s"
    Store(root).add(peft_folders.lora, "a")
    assert json.loads((root / "store.json").read_text()) == {"format": "adapterkit-store", "version": 1}
    (root / "store.json").write_text(json.dumps({"format": "adapterkit-store", "version": 2}))
    before = snapshot(root)
    for action in (
        lambda s: s.add(peft_folders.lora, "b"),
        lambda s: s.resolve("a"),
        lambda s: s.list(),
        lambda s: s.verify(),
        lambda s: s.gc(grace=0),
    ):
        with pytest.raises(StoreError, match="store format version 2") as exc:
            action(Store(root))
        assert_one_line(exc.value)
    assert_cli_error(run_cli(root, "list"), "version 2")
    (root / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable store marker"):
        Store(root).list()
    (root / "store.json").write_text(json.dumps({"format": "adapterkit-store", "version": 2}))
    assert snapshot(root) == before


def test_foreign_and_fresh_directories_are_left_alone(tmp_path: Path, peft_folders: Any, snapshot: Snapshot) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    with pytest.raises(StoreError, match="not an adapterkit store"):
        Store(foreign).add(peft_folders.lora, "a")
    assert snapshot(foreign) == before
    # reading, verify and gc on a path without a store create nothing, and a later add still works
    for root in (tmp_path / "missing", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        s = Store(root)
        assert s.list() == [] and s.verify().ok and s.gc(grace=0).removed == []
        assert run_cli(root, "verify").returncode == 0 and run_cli(root, "gc").returncode == 0
        assert not root.exists() or not any(root.iterdir())
        assert s.add(peft_folders.lora, "a").digest == Store(root).resolve("a")
    # a first writer killed before store.json appeared leaves locks/ and tmp/: still usable
    half = tmp_path / "half"
    (half / "locks").mkdir(parents=True)
    (half / "tmp").mkdir()
    (half / "tmp" / "123-dead.write").write_bytes(b"{")
    Store(half).add(peft_folders.lora, "a")
    assert Store(half).verify().ok


def test_registry_work_never_imports_torch(tmp_path: Path, make_adapter: Callable[..., Path]) -> None:
    """add (safetensors), resolve, show, list, tag, rm, export, verify and gc run without importing torch."""
    folder = make_adapter("a", seed=1)
    script = f"""
import sys
from adapterkit import Store
store = Store({str(tmp_path / "store")!r})
digest = store.add({str(folder)!r}, "a").digest
store.tag("a", "b"); store.resolve(digest[:12]); store.show("a"); store.list(); store.remove("b")
store.export("a", {str(tmp_path / "out")!r}); store.reflog("a")
assert store.verify(full=True).ok
store.gc(grace=0)
assert "torch" not in sys.modules, "torch was imported"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- 4. corruption -----------------------------------------------------------------------------------------------------


def test_corruption_is_reported_quarantined_and_blocks_gc(
    store: Store, peft_folders: Any, make_adapter: Callable[..., Path]
) -> None:
    flipped = store.add(peft_folders.lora, "flipped").digest
    truncated = store.add(peft_folders.lora2, "truncated").digest
    garbage = store.add(peft_folders.lora_mlp, "garbage").digest
    healthy_folder = make_adapter("healthy", seed=7)
    healthy = store.add(healthy_folder, "healthy").digest
    weights = store.blobs.path(layers_of(store, flipped)["adapter_model.safetensors"])
    assert weights.name not in {store.blobs.path(d).name for d in layers_of(store, healthy).values()}
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    manifest = store.manifests.path(truncated)
    os.chmod(manifest, 0o644)
    manifest.write_bytes(manifest.read_bytes()[:40])
    store.refs.path("garbage", "latest").write_bytes(b"\x00\xffnot a digest\n")

    # reads fail with one clear line; gc refuses before touching anything
    for ref, kind in (("flipped", IntegrityError), ("truncated", IntegrityError), ("garbage", StoreError)):
        with pytest.raises(kind) as exc:
            store.get(ref)
        assert_one_line(exc.value)
    with pytest.raises(StoreError, match="gc refused") as refused:
        store.gc(grace=0)
    assert_one_line(refused.value)
    assert_cli_error(run_cli(store, "gc", "--grace", "0s"), "gc refused")

    report = store.verify()
    assert not report.ok
    found = {(p.kind, p.path) for p in report.problems}
    weights_rel = weights.relative_to(store.root).as_posix()
    manifest_rel = manifest.relative_to(store.root).as_posix()
    assert ("blob", weights_rel) in found
    assert ("manifest", manifest_rel) in found
    assert ("ref", "refs/garbage/_tags/latest") in found
    assert ("ref", "refs/truncated/_tags/latest") in found  # points at the quarantined manifest
    assert ("manifest", store.manifests.path(flipped).relative_to(store.root).as_posix()) in found  # blob gone
    assert not any(healthy.removeprefix("sha256:")[2:] in p.path for p in report.problems)
    corrupt = sorted(p.name for p in (store.root / "corrupt").iterdir())
    assert len(corrupt) == 2 and {n.split("-")[0] for n in corrupt} == {"blobs", "manifests"}
    assert sorted(report.quarantined) == sorted(f"corrupt/{n}" for n in corrupt)
    assert not weights.exists() and not manifest.exists()
    assert_objects_hash_to_names(store)
    proc = run_cli(store, "verify")
    assert proc.returncode == 1 and "problem: ref refs/garbage/_tags/latest" in proc.stdout, proc.stdout

    # the damaged adapters stay unreadable with a clear message; the others still load
    for ref in ("flipped", "truncated", "garbage"):
        with pytest.raises(AdapterkitError) as exc:
            store.get(ref)
        assert_one_line(exc.value)
        assert_cli_error(run_cli(store, "export", ref, str(store.root.parent / f"out-{ref}")))
    assert_same_adapter(store.get("healthy"), healthy_folder)
    with pytest.raises(StoreError, match="gc refused"):
        store.gc(grace=0)

    # repair: re-adding restores the quarantined objects, re-pointing the ref fixes it; then all is clean
    store.add(peft_folders.lora, "flipped")
    store.add(peft_folders.lora2, "truncated")
    store.tag(garbage, "garbage")
    assert store.verify(full=True).ok
    store.gc(grace=0)
    assert store.verify(full=True).ok
    for ref, folder in (
        ("flipped", peft_folders.lora),
        ("truncated", peft_folders.lora2),
        ("garbage", peft_folders.lora_mlp),
    ):
        assert_same_adapter(store.get(ref), folder)


def test_gc_refuses_while_an_unreferenced_manifest_is_unreadable(
    store: Store, make_adapter: Callable[..., Path], snapshot: Snapshot
) -> None:
    store.add(make_adapter("a", seed=1), "a")
    loose = store.add(make_adapter("b", seed=2)).digest  # no ref: only its manifest says which blobs it needs
    manifest = store.manifests.path(loose)
    os.chmod(manifest, 0o644)
    manifest.write_bytes(manifest.read_bytes()[:-3])
    age_objects(store, 2 * 86400)
    before = snapshot(store.root)
    with pytest.raises(StoreError, match=f"gc refused: manifest \\(object {loose}\\)") as exc:
        store.gc(grace=0)
    assert_one_line(exc.value)
    assert snapshot(store.root) == before


def test_a_wrong_sized_object_is_replaced_by_the_next_writer(store: Store, make_adapter: Callable[..., Path]) -> None:
    folder = make_adapter("a", seed=1)
    digest = store.add(folder, "a").digest
    weights = store.blobs.path(layers_of(store, digest)["adapter_model.safetensors"])
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes()[:100])  # e.g. a copy cut short by hand
    result = store.add(folder, "a")
    assert result.digest == digest and result.new_bytes > 0
    assert len(list((store.root / "corrupt").iterdir())) == 1  # moved aside, not deleted
    assert store.verify(full=True).ok
    assert_same_adapter(store.get("a"), folder)


def test_an_object_another_program_keeps_replacing_is_not_published(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time adapterkit links its object in, something else has put a wrong file there first."""
    with store.writing():
        pass  # the store exists

    def intruder(source: Path, target: Path) -> None:
        Path(target).write_bytes(b"not the object")
        raise FileExistsError(target)

    monkeypatch.setattr(os, "link", intruder)
    data = b"the object's bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(StoreError) as info:
        store.blobs.put_bytes(data)
    assert str(info.value) == (
        f"cannot publish {digest}: another program keeps replacing {store.blobs.path(digest)}; stop anything else "
        "that writes into this store, run `adapterkit verify`, then retry"
    )
    assert len(list((store.root / "corrupt").iterdir())) == 2  # each intruding file was moved aside, not deleted


def test_verify_reports_strays_and_gc_leaves_them(store: Store, peft_folders: Any) -> None:
    store.add(peft_folders.lora, "a")
    stray_file = store.blobs.root / "ab" / "not-a-digest"
    stray_file.parent.mkdir(parents=True, exist_ok=True)
    stray_file.write_text("x")
    stray_dir = store.manifests.root / "zz"
    stray_dir.mkdir()
    (stray_dir / "notes").write_text("y")
    age_objects(store, 10 * 86400)
    report = store.verify()
    assert {(p.kind, p.path) for p in report.problems} == {
        ("blob", "blobs/sha256/ab/not-a-digest"),
        ("manifest", "manifests/sha256/zz"),
    }
    store.gc(grace=0)
    assert stray_file.exists() and stray_dir.exists()
    assert_same_adapter(store.get("a"), peft_folders.lora)


def test_verify_cache_still_catches_changes(store: Store, peft_folders: Any) -> None:
    digest = store.add(peft_folders.lora, "a").digest
    first = store.verify()
    assert first.ok and first.hashed_bytes > 0
    assert store.verify().hashed_bytes == 0  # unchanged files are not hashed twice
    weights = store.blobs.path(layers_of(store, digest)["adapter_model.safetensors"])
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x80
    weights.write_bytes(bytes(data))
    assert not store.verify().ok


# -- 5. bad input ------------------------------------------------------------------------------------------------------

BAD_REFS = [
    "..",
    "../escape",
    "a/../b",
    "/abs/path",
    "/",
    "a//b",
    "a/",
    "a\x00b",
    "Upper",
    "name:",
    "name:.hidden",
    "name:-dash",
    "a:b:c",
    "x" * 256,
    "name:" + "t" * 129,
    "",
    " ",
    "ünïcode",
    "name@sha256:1234",
    "sha256:abcd",  # reads as a digest prefix: cannot be written to
]


@pytest.mark.parametrize("bad", BAD_REFS)
def test_bad_refs_are_refused_before_anything_is_written(
    store: Store, peft_folders: Any, snapshot: Snapshot, bad: str
) -> None:
    store.add(peft_folders.lora, "existing")
    before = snapshot(store.root)
    for action in (lambda: store.add(peft_folders.lora, bad), lambda: store.tag("existing", bad)):
        with pytest.raises(InvalidReferenceError) as exc:
            action()
        assert_one_line(exc.value)
    assert snapshot(store.root) == before
    if "\x00" not in bad:  # argv cannot carry NUL
        assert_cli_error(run_cli(store, "add", str(peft_folders.lora), "--tag", bad))
        assert_cli_error(run_cli(store, "tag", "existing", bad))
    assert snapshot(store.root) == before


def test_reference_length_limits(store: Store, peft_folders: Any) -> None:
    longest = "a/" * 125 + "a:" + "t" * 3  # 255 characters
    assert len(longest) == 255
    digest = store.add(peft_folders.lora, longest).digest
    assert store.resolve(longest) == digest and store.refs_by_digest()[digest] == [longest]
    tag_limit = "n:" + "T" * 128
    assert store.add(peft_folders.lora, tag_limit).digest == digest and store.resolve(tag_limit) == digest
    with pytest.raises(InvalidReferenceError, match="limit is 255"):
        store.add(peft_folders.lora, longest + "t")
    assert store.verify().ok


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.text(alphabet="abcXYZ019._-/:@\x00 ", max_size=40),
        st.builds("".join, st.lists(st.sampled_from(["a", "..", "/", "b", ":", "x" * 130, "\x00", "A", "."]))),
    )
)
def test_any_refused_ref_leaves_the_store_unchanged(store: Store, peft_folders: Any, text: str) -> None:
    from adapterkit.store import parse_tag_ref

    if not store.initialised():
        store.add(peft_folders.lora, "existing")
    try:
        parse_tag_ref(text)
    except InvalidReferenceError:
        pass
    else:
        return  # valid names are exercised in test_names.py
    before = _cheap_snapshot(store.root)
    with pytest.raises(InvalidReferenceError) as exc:
        store.tag("existing", text)
    assert_one_line(exc.value)
    with pytest.raises(InvalidReferenceError):
        store.add(peft_folders.lora, text)
    assert _cheap_snapshot(store.root) == before


def _cheap_snapshot(root: Path) -> set[tuple[str, int, int]]:
    return {(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_folder_problems_are_refused(
    store: Store,
    peft_folders: Any,
    make_adapter: Callable[..., Path],
    copy_folder: Callable[[Path, str], Path],
    tmp_path: Path,
    snapshot: Snapshot,
) -> None:
    store.add(peft_folders.lora, "existing")
    before = snapshot(store.root)

    no_config = copy_folder(peft_folders.lora, "no_config")
    (no_config / "adapter_config.json").unlink()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    no_weights = copy_folder(peft_folders.lora, "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    huge_header = copy_folder(peft_folders.lora, "huge_header")
    weights = huge_header / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**62) + weights.read_bytes()[8:])
    garbage_header = copy_folder(peft_folders.lora, "garbage_header")
    (garbage_header / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{{{{{")
    truncated = copy_folder(peft_folders.lora, "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:-16])
    wrong_rank = make_adapter("wrong_rank", r=8, config={"r": 4})
    wrong_pattern = make_adapter("wrong_pattern", r=8, config={"rank_pattern": {"q_proj": 2}})
    config_not_json = copy_folder(peft_folders.lora, "config_not_json")
    (config_not_json / "adapter_config.json").write_text("{'r': 8")

    cases: list[tuple[Path, type[Exception], str]] = [
        (no_config, AdapterFormatError, "no adapter_config.json"),
        (tmp_path / "missing", AdapterFormatError, "not a directory"),
        (not_a_dir, AdapterFormatError, "not a directory"),
        (no_weights, AdapterFormatError, "no adapter_model.safetensors"),
        (huge_header, AdapterFormatError, "header claims"),
        (garbage_header, AdapterFormatError, "not valid JSON"),
        (truncated, AdapterFormatError, "truncated"),
        (wrong_rank, AdapterFormatError, "r=4"),
        (wrong_pattern, AdapterFormatError, "rank_pattern"),
        (config_not_json, AdapterFormatError, "not valid JSON"),
    ]
    for folder, kind, needle in cases:
        with pytest.raises(kind, match=needle) as exc:
            store.add(folder, "new")
        assert_one_line(exc.value)
        assert snapshot(store.root) == before, folder
    for folder, _, needle in cases[:3] + cases[4:5] + cases[7:8]:
        assert_cli_error(run_cli(store, "add", str(folder), "--tag", "new"), needle)
    assert snapshot(store.root) == before


@pytest.mark.parametrize(
    ("override", "kind", "needle"),
    [
        ({"r": -1}, AdapterFormatError, "'r'"),
        ({"r": "8"}, AdapterFormatError, "'r'"),
        ({"peft_type": "IA3"}, UnsupportedAdapterError, "non-LoRA"),
        ({"peft_type": "NOPE"}, UnsupportedAdapterError, "peft_type"),
        ({"peft_type": None}, AdapterFormatError, "peft_type"),
        ({"lora_alpha": "big"}, AdapterFormatError, "lora_alpha"),
        ({"use_rslora": "yes"}, AdapterFormatError, "use_rslora"),
        ({"rank_pattern": {"(": 4}}, AdapterFormatError, "not a valid regex"),
        ({"target_parameters": ["w"]}, UnsupportedAdapterError, "target_parameters"),
    ],
)
def test_invalid_configs_are_refused(
    store: Store,
    make_adapter: Callable[..., Path],
    snapshot: Snapshot,
    override: dict[str, Any],
    kind: type[Exception],
    needle: str,
) -> None:
    store.add(make_adapter("good", seed=1), "existing")
    before = snapshot(store.root)
    folder = make_adapter("bad", seed=2, config=override)
    with pytest.raises(kind, match=needle) as exc:
        store.add(folder, "bad")
    assert_one_line(exc.value)
    assert snapshot(store.root) == before
    assert_cli_error(run_cli(store, "add", str(folder), "--tag", "bad"), needle)
    assert snapshot(store.root) == before


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    override=st.dictionaries(
        st.sampled_from(
            [
                "r",
                "lora_alpha",
                "peft_type",
                "use_rslora",
                "rank_pattern",
                "alpha_pattern",
                "target_modules",
                "task_type",
                "fan_in_fan_out",
                "base_model_name_or_path",
                "revision",
                "use_dora",
                "modules_to_save",
            ]
        ),
        st.one_of(
            _JSON_SCALARS,
            st.sampled_from(["LORA", "IA3", 8, 16, 0]),
            st.lists(_JSON_SCALARS, max_size=3),
            st.dictionaries(st.sampled_from(["q_proj", "v_proj", "(", ".*"]), _JSON_SCALARS, max_size=2),
        ),
        max_size=4,
    )
)
def test_any_config_is_stored_faithfully_or_refused_cleanly(
    tmp_path: Path, make_adapter: Callable[..., Path], override: dict[str, Any]
) -> None:
    store = Store(tmp_path / "store")
    if not store.initialised():
        store.add(make_adapter("good", seed=1), "existing")
    folder = tmp_path / "src" / "fuzzed"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    make_adapter("fuzzed", seed=3, config=override)
    before = _cheap_snapshot(store.root)
    try:
        digest = store.add(folder, "fuzzed").digest
    except AdapterkitError as exc:
        assert isinstance(exc, InvalidInputError), repr(exc)
        assert_one_line(exc)
        assert _cheap_snapshot(store.root) == before
        return
    # Faithfully as PEFT reads it: set-valued fields (target_modules, ...) sorted and de-duplicated, as documented.
    original = json.loads((folder / "adapter_config.json").read_text())
    assert store.show("fuzzed")["peft_config"] == canonical_config(original)
    assert store.resolve(digest) == digest


def test_bin_needing_unpickling_is_refused_without_running_it(
    store: Store, peft_folders: Any, copy_folder: Callable[[Path, str], Path], tmp_path: Path, snapshot: Snapshot
) -> None:
    store.add(peft_folders.lora, "existing")
    before = snapshot(store.root)
    folder = copy_folder(peft_folders.lora_bin, "evil_bin")
    marker = tmp_path / "pwned"
    tensors = torch.load(folder / "adapter_model.bin", weights_only=True)
    tensors["evil"] = _Evil(str(marker))
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="refused for safety") as exc:
        store.add(folder, "evil")
    assert_one_line(exc.value)
    assert not marker.exists()
    assert_cli_error(run_cli(store, "add", str(folder), "--tag", "evil"), "refused for safety")
    assert not marker.exists()
    assert snapshot(store.root) == before


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class _Evil:
    """Unpickling this calls _touch: a weights-only loader must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (self.path,))


# -- 6. disk full ------------------------------------------------------------------------------------------------------


class _DiskFull:
    """Stands in for the ``os`` module inside adapterkit.files.fsutil: ``write`` fails with ENOSPC past a budget."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.written = 0
        self.calls: list[int] = []  # bytes written before each write call

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        self.calls.append(self.written)
        room = len(data) if self.budget is None else self.budget - self.written
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, data[:room])
        self.written += written
        return written


def _write_budgets(store: Store, folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Byte counts at which to run out of space: the start of every write of an add, and half-way into each."""
    counter = _DiskFull(None)
    monkeypatch.setattr(fsutil, "os", counter)
    store.add(folder, "new")
    monkeypatch.undo()
    starts = [*counter.calls, counter.written]
    budgets = set(starts)
    budgets |= {(a + b) // 2 for a, b in itertools.pairwise(starts) if b - a > 1}
    return sorted(b for b in budgets if b < counter.written)


def test_disk_full_publishes_nothing_and_gc_cleans_up(
    tmp_path: Path, peft_folders: Any, make_adapter: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_adapter("big", seed=5, dim=512, modules=4)
    probe = Store(tmp_path / "probe-store")
    probe.add(peft_folders.lora, "existing")  # the same starting point as each store below
    budgets = _write_budgets(probe, folder, monkeypatch)
    assert len(budgets) >= 10  # weights chunks, config, readme, metadata, manifest, reflog, ref
    for budget in budgets:
        store = Store(tmp_path / f"store-{budget}")
        store.add(peft_folders.lora, "existing")
        objects_before = object_files(store)
        refs_before = {(n, t): store.refs.read(n, t) for n, t, _ in store.refs}
        disk = _DiskFull(budget)
        monkeypatch.setattr(fsutil, "os", disk)
        with pytest.raises(StoreError, match="No space left on device") as exc:
            store.add(folder, "new")
        monkeypatch.undo()
        assert_one_line(exc.value)
        assert disk.written <= budget
        assert not any(store.tmp.iterdir())  # the failed writer removed its own temp file
        assert {(n, t): store.refs.read(n, t) for n, t, _ in store.refs} == refs_before
        new_manifests = {p for p in object_files(store) - objects_before if p.startswith("manifests/")}
        reached_ref_update = (store.refs.logs / "new" / "_tags" / "latest").exists()
        assert not new_manifests or reached_ref_update, budget  # a manifest only once its ref was being written
        assert store.verify().ok
        store.gc(grace=0)
        assert object_files(store) == objects_before
        assert not store.tmp.exists() or not any(store.tmp.iterdir())
        # and the store works normally afterwards
        digest = store.add(folder, "new").digest
        assert store.verify().ok and store.resolve("new") == digest
        assert store.reflog("new")[-1]["new"] == digest


def test_disk_full_on_fsync_is_a_store_error(
    store: Store, make_adapter: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add(make_adapter("a", seed=1), "existing")
    before = object_files(store)

    class FsyncFails:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def fsync(self, fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil, "os", FsyncFails())
    with pytest.raises(StoreError, match="No space left"):
        store.add(make_adapter("b", seed=2), "b")
    monkeypatch.undo()
    assert store.refs.read("b", "latest") is None
    store.gc(grace=0)
    assert object_files(store) == before and not any(store.tmp.iterdir())


# -- 7. gc -------------------------------------------------------------------------------------------------------------


def test_gc_keeps_what_refs_reach_and_removes_old_unreachable_objects_manifests_first(
    store: Store, peft_folders: Any, make_adapter: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = store.add(peft_folders.lora, "kept").digest
    shares_weights = store.add(peft_folders.lora, "based", base=peft_folders.base).digest
    dropped = store.add(make_adapter("dropped", seed=11), "dropped").digest
    untagged = store.add(make_adapter("untagged", seed=12)).digest
    store.remove("based")
    store.remove("dropped")
    (store.tmp / "999999-stale.blob").write_bytes(b"half a blob")
    age_objects(store, 2 * 86400)
    shift_reflogs(store, 2 * 86400)

    doomed = (
        {store.manifests.path(d) for d in (shares_weights, dropped, untagged)}
        | {store.blobs.path(b) for d in (dropped, untagged) for b in layers_of(store, d).values()}
        | {store.blobs.path(store.manifest(d)[0].digest) for d in (shares_weights, dropped, untagged)}
        | {store.tmp / "999999-stale.blob"}
    )
    doomed -= {store.blobs.path(b) for b in layers_of(store, kept).values()}  # shared README etc. stay
    expected = sorted(p.relative_to(store.root).as_posix() for p in doomed)

    dry = store.gc(grace=3600, dry_run=True)
    assert dry.dry_run and sorted(path for path, _ in dry.removed) == expected
    assert dry.freed_bytes == sum(p.stat().st_size for p in doomed)
    assert all(p.exists() for p in doomed)
    proc = run_cli(store, "--json", "gc", "--dry-run", "--grace", "1h")
    assert proc.returncode == 0 and sorted(r["path"] for r in json.loads(proc.stdout)["removed"]) == expected

    order: list[str] = []
    real_remove = gc_module.remove_quietly

    def recording_remove(path: Path) -> None:
        order.append(path.relative_to(store.root).parts[0])
        real_remove(path)

    monkeypatch.setattr(gc_module, "remove_quietly", recording_remove)
    report = store.gc(grace=3600)
    assert sorted(path for path, _ in report.removed) == expected
    assert order == sorted(order, key=["manifests", "blobs", "tmp"].index)  # manifests, then blobs, then temp
    assert order.count("manifests") == 3
    assert not any(p.exists() for p in doomed)
    assert store.verify(full=True).ok
    assert_same_adapter(store.get("kept"), peft_folders.lora)
    assert store.gc(grace=0).removed == []


def test_gc_grace_period_and_recent_reflog_entries(
    store: Store, make_adapter: Callable[..., Path], peft_folders: Any
) -> None:
    store.add(peft_folders.lora, "kept")
    young = store.add(make_adapter("young", seed=1)).digest  # untagged, just written
    recently_removed = store.add(make_adapter("recent", seed=2), "recent").digest
    store.remove("recent")
    age_objects(store, 7200)  # objects are 2 h old; the reflog entries are fresh
    os.utime(store.manifests.path(young))  # ...except the young adapter's manifest
    for blob in layers_of(store, young).values():
        os.utime(store.blobs.path(blob))

    store.gc(grace=3600)
    assert store.manifests.exists(young)  # younger than the grace
    assert store.manifests.exists(recently_removed)  # a recent reflog entry names it
    assert store.resolve(recently_removed) == recently_removed
    assert store.verify().ok

    shift_reflogs(store, 7200)
    report = store.gc(grace=3600)
    assert not store.manifests.exists(recently_removed)
    assert store.manifests.exists(young)
    assert any(path.startswith("manifests/") for path, _ in report.removed)
    store.gc(grace=0)
    assert not store.manifests.exists(young)
    assert store.verify().ok and store.resolve("kept")


def test_gc_is_not_starved_by_overlapping_writers(tmp_path: Path) -> None:
    """flock has no queue; the turnstile makes gc's exclusive lock win against a steady stream of writers."""
    import threading

    from adapterkit.store.locks import gc_lock

    stop = threading.Event()
    inside = threading.Semaphore(0)

    def writer() -> None:
        while not stop.is_set():
            with gc_lock(tmp_path, exclusive=False, timeout=30):
                inside.release()
                time.sleep(0.02)  # the write itself; some writer is always inside the lock

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(8):
        inside.acquire()  # writers are going strong
    try:
        started = time.monotonic()
        with gc_lock(tmp_path, exclusive=True, timeout=5):
            waited = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert waited < 3.0  # starved, it would time out after 5 s


def test_a_held_store_lock_is_named_as_the_store_lock(store: Store, make_adapter: Callable[..., Path]) -> None:
    """The lock is called gc.lock, but a writer waiting for it is not running gc: the message says what holds it."""
    from adapterkit.store.locks import gc_lock

    folder = make_adapter("a", seed=1)
    store.add(folder, "a")
    waiting = Store(store.root, lock_timeout=0.1)
    # a gc is running
    with gc_lock(store.root / "locks", exclusive=True, timeout=5), pytest.raises(StoreLockedError) as info:
        waiting.add(folder, "b")
    assert str(info.value) == (
        f"timed out after 0 s waiting for the store lock ({store.root / 'locks' / 'gc.lock'}); another adapterkit "
        "process holds it (a gc, or a command writing to or verifying this store): retry when it is done"
    )
    # a writer is inside
    with (
        gc_lock(store.root / "locks", exclusive=False, timeout=5),
        pytest.raises(StoreLockedError, match=r"waiting for the store lock .*\(a gc, or a command writing"),
    ):
        waiting.gc()
    assert waiting.add(folder, "b").digest == store.resolve("a")


def test_gc_after_a_shorter_grace_does_not_refuse(store: Store, make_adapter: Callable[..., Path]) -> None:
    """A recent reflog entry naming an adapter that an earlier ``gc --grace 0s`` removed is history, not damage."""
    store.add(make_adapter("a", seed=1), "a")
    gone = store.add(make_adapter("b", seed=2), "b").digest
    store.remove("b")
    store.gc(grace=0)
    assert not store.manifests.exists(gone)
    assert store.gc().removed == []  # default grace: the reflog entries for b are recent
    assert store.verify().ok


def test_readding_an_old_unreachable_adapter_freshens_it(store: Store, make_adapter: Callable[..., Path]) -> None:
    folder = make_adapter("a", seed=1)
    digest = store.add(folder, "a").digest
    store.remove("a")
    age_objects(store, 2 * 86400)
    shift_reflogs(store, 2 * 86400)
    again = store.add(folder)  # untagged: only the fresh mtimes protect it now
    assert again.digest == digest and again.new_bytes == 0
    assert store.gc(grace=3600).removed == []
    assert store.resolve(digest) == digest
    assert {p for p, _ in store.gc(grace=0).removed} >= {
        store.manifests.path(digest).relative_to(store.root).as_posix()
    }


def test_add_with_a_tied_base_accepts_an_lm_head_adapter(tmp_path: Path) -> None:
    """transformers stores no lm_head for a tied model; the adapter still fits the embedding it shares."""
    from helpers import save_base, save_lora, tiny_llama

    base = tiny_llama(tie_word_embeddings=True)
    base_dir = save_base(base, tmp_path / "tied")
    folder = save_lora(base, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    result = Store(tmp_path / "store").add(folder, "head", base=base_dir)
    assert result.info["base_model"]["structure_digest"].startswith("sha256:")


@pytest.mark.parametrize("parse", ["parse_manifest", "parse_metadata"])
def test_documents_nested_beyond_the_parser_are_integrity_errors(parse: str) -> None:
    """A remote can serve any bytes as a manifest: a bomb of nesting is refused, not a traceback."""
    from adapterkit.store import documents

    with pytest.raises(IntegrityError, match=r"^manifest sha256:ab: not valid JSON \(nested too deeply\)$"):
        getattr(documents, parse)(b"[" * 100_000 + b"]" * 100_000, "manifest sha256:ab")
