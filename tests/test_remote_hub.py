"""The ``hf://`` remote against a real Hub API on 127.0.0.1: olah serves the reads, tests/hub_server.py the writes.

Every push is read back through olah (an independent implementation of the Hub's read API over the same git
repositories), every pull is made by the real huggingface_hub client, and PEFT itself loads what was pushed.
Assertions about what crossed the wire are made on the server side: the commits it accepted, the bytes
they carried, the requests it saw.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapterkit_hub.card import model_card
from adapterkit_hub.remote import MANIFEST_PATH, METADATA_PATH, HubRemote
from adapterkit_hub.url import HubURL, default_local_ref, parse_hf_url
from hub_server import HubServer

from adapterkit import Store, sync
from adapterkit.errors import (
    AdapterFormatError,
    IntegrityError,
    InvalidReferenceError,
    ReferenceNotFoundError,
    RemoteConflictError,
    SyncError,
    UnsupportedAdapterError,
)
from adapterkit.plugins import Plugins

_names = itertools.count()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """olah + the write front-end on 127.0.0.1, started once for the module's tests, stopped at the end."""
    server = HubServer(tmp_path_factory.mktemp("hub"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """huggingface_hub cut off from the machine's Hub settings: own HF_HOME, no token, not offline, no telemetry.

    The test Hub has no Xet storage, so uploads take Git LFS: ``HF_HUB_DISABLE_XET=1``, as its users must set
    (test_xet_without_a_write_token_is_one_clear_line shows what happens without it).
    Per test, so nothing leaks into other modules. The constants are patched too: huggingface_hub read
    them at import, possibly long before this fixture ran.
    """
    import huggingface_hub.constants as constants

    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def fresh(hub: HubServer) -> Iterator[HubServer]:
    """The session's Hub with its records, faults and token requirement cleared before and after the test."""
    hub.reset()
    yield hub
    hub.reset()


def repo_name(prefix: str = "adapter") -> str:
    return f"org/{prefix}-{next(_names)}"


def remote(hub: HubServer, url: str) -> HubRemote:
    return HubRemote(url, endpoint=hub.endpoint)


def gets(hub: HubServer, filename: str) -> int:
    """How many times a client downloaded ``filename`` (GET on a resolve URL)."""
    return sum(
        1 for method, path in hub.requests if method == "GET" and "/resolve/" in path and path.endswith(filename)
    )


def file_sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_untouched(store: Store, refs_before: dict[str, list[str]]) -> None:
    """Nothing half-written: the refs are what they were and the store verifies clean."""
    assert store.refs_by_digest() == refs_before
    assert store.verify().ok


def with_config(source: Path, dest: Path, **changes: Any) -> Path:
    """A copy of a PEFT folder with ``changes`` merged into its adapter_config.json."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dest


# -- URLs ------------------------------------------------------------------------------------------------------


def test_url_rules() -> None:
    assert parse_hf_url("hf://org/name") == HubURL("org/name", None)
    assert parse_hf_url("hf://gpt2@v1") == HubURL("gpt2", "v1")
    assert parse_hf_url("hf://org/name@refs/pr/1") == HubURL("org/name", "refs/pr/1")
    assert parse_hf_url("org/Name.v2@" + "a" * 40) == HubURL("org/Name.v2", "a" * 40)
    assert str(parse_hf_url("hf://org/name@dev")) == "hf://org/name@dev"
    for bad in ("hf://", "hf://org/name/extra", "hf://org/name@", "hf://org/na--me", "s3://org/name", "hf://a b/c"):
        with pytest.raises(InvalidReferenceError):
            parse_hf_url(bad)
    with pytest.raises(InvalidReferenceError, match="model repositories"):
        parse_hf_url("hf://datasets/org/name")
    assert default_local_ref(parse_hf_url("hf://Org/My-LoRA")) == "my-lora:latest"
    assert default_local_ref(parse_hf_url("hf://org/x@v1.0")) == "x:v1.0"
    assert default_local_ref(parse_hf_url("hf://org/x@refs/pr/1")) == "x:refs-pr-1"
    with pytest.raises(InvalidReferenceError, match="--tag"):
        default_local_ref(parse_hf_url("hf://org/x_"))


def test_registered_as_plugin() -> None:
    plugins = Plugins()
    assert plugins.remote_owners()["hf"] == "hf"
    opened = sync.open_remote("hf://org/name@dev", plugins=plugins)
    assert isinstance(opened, HubRemote) and opened.target == HubURL("org/name", "dev")


# -- round trip ------------------------------------------------------------------------------------------------


def test_round_trip_exact_digest_and_peft_loads(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """store A -> push -> pull -> store B keeps the digest; PEFT loads the repo straight from the Hub."""
    from helpers import load_peft, logits, tiny_llama
    from huggingface_hub import HfApi

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    digest = a.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name("demo")
    sent: list[int] = []
    pushed = remote(fresh, f"hf://{repo}").push(a, digest, "demo", "v1", progress=sent.append)
    assert (pushed.digest, pushed.ref, pushed.skipped_bytes) == (digest, f"hf://{repo}@v1", 0)
    assert sum(sent) == pushed.transferred_bytes > 0

    # Server side: one commit, carrying the PEFT files, the card and adapterkit's manifest and metadata.
    [commit] = fresh.commits
    assert set(commit.files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        MANIFEST_PATH,
        METADATA_PATH,
        ".adapterkit/README.md",
    }
    # The weights went by Git LFS (a basic-transfer PUT of the stored blob), the rest inline in the commit.
    layers = {layer.title: layer for layer in a.manifest(digest)[1]}
    weights_sha = layers["adapter_model.safetensors"].digest.removeprefix("sha256:")
    assert commit.lfs == {"adapter_model.safetensors": weights_sha} and commit.files["adapter_model.safetensors"] == 0
    assert [(u.oid, u.size) for u in fresh.lfs_uploads] == [(weights_sha, layers["adapter_model.safetensors"].size)]
    assert commit.received_bytes + sum(u.size for u in fresh.lfs_uploads) == pushed.transferred_bytes
    files = fresh.files_at(repo, "v1")
    assert file_sha(files[MANIFEST_PATH]) == digest
    for title, layer in layers.items():
        hub_path = ".adapterkit/README.md" if title == "README.md" else title
        assert file_sha(files[hub_path]) == layer.digest
    # The Hub (olah) reports the weights as an LFS file with the stored blob's sha256.
    api = HfApi(endpoint=fresh.olah_endpoint)
    [weights] = api.get_paths_info(repo, ["adapter_model.safetensors"], revision="v1")
    assert weights.lfs is not None and f"sha256:{weights.lfs.sha256}" == layers["adapter_model.safetensors"].digest
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo).tags} == {"v1": commit.oid}

    received: list[int] = []
    pulled = remote(fresh, f"hf://{repo}").pull(b, progress=received.append)
    assert sum(received) == pulled.transferred_bytes > 0
    local = f"{repo.split('/')[1]}:latest"
    assert (pulled.digest, pulled.ref, pulled.skipped_bytes) == (digest, local, 0)
    assert b.resolve(local) == digest and b.verify().ok
    assert b.reflog(local)[-1]["message"].startswith(f"pull hf://{repo}")

    # PEFT loads the repository as served by olah alone, and computes what the original adapter computes.
    snapshot = api.snapshot_download(repo, revision="v1", cache_dir=tmp_path / "hf-cache")
    base = tiny_llama(seed=0)
    expected = logits(load_peft(base, peft_folders.lora))
    assert torch.equal(logits(load_peft(base, Path(snapshot))), expected)
    assert torch.equal(logits(load_peft(base, b.export(local, tmp_path / "export").path)), expected)


def test_second_push_sends_nothing(fresh: HubServer, peft_folders: Any, write_folder: Any, tmp_path: Path) -> None:
    """Re-pushing sends no file bytes (no commit at all); another tag only adds a Hub tag; shared blobs stay put."""
    store = Store(tmp_path / "s")
    digest = store.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name()
    hf = remote(fresh, f"hf://{repo}")
    first = hf.push(store, digest, "demo", "v1")
    assert len(fresh.commits) == 1
    fresh.reset()

    again = hf.push(store, digest, "demo", "v1")
    assert (again.transferred_bytes, again.skipped_bytes) == (0, first.transferred_bytes)
    assert fresh.commits == []
    assert not any("/preupload/" in path or "/commit/" in path for _, path in fresh.requests)

    other_tag = hf.push(store, digest, "demo", "v2")
    assert other_tag.transferred_bytes == 0 and fresh.commits == []
    refs = {t.name: t.target_commit for t in hf.api.list_repo_refs(repo).tags}
    assert refs["v1"] == refs["v2"]

    # Same weights and config, another README: only the card, the own README and the documents travel.
    renamed = shutil.copytree(peft_folders.lora, tmp_path / "renamed")
    (renamed / "README.md").write_text("# renamed\n")
    twin = store.add(renamed, "demo:v3").digest
    hf.push(store, twin, "demo", "v3")
    [commit] = fresh.commits
    assert set(commit.files) == {"README.md", ".adapterkit/README.md", MANIFEST_PATH}
    assert commit.deleted == []

    # An adapter without a README: the old own README is deleted, not left to contradict the manifest.
    bare = store.add(write_folder(tmp_path / "bare", readme=None), "demo:v4").digest
    hf.push(store, bare, "demo", "v4")
    assert fresh.commits[-1].deleted == [".adapterkit/README.md"]
    assert hf.pull(Store(tmp_path / "t")).digest == bare


def test_push_to_branch_and_moving_tag(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """``@branch`` commits there (creating it); re-pushing a tag moves it, as a registry tag moves."""
    store = Store(tmp_path / "s")
    one = store.add(peft_folders.lora, "demo:v1").digest
    two = store.add(peft_folders.lora2, "demo:v1").digest
    repo = repo_name()
    main_head = remote(fresh, f"hf://{repo}").push(store, one, "demo", "stable")
    dev = remote(fresh, f"hf://{repo}@dev").push(store, two, "demo", "latest")
    assert dev.ref == f"hf://{repo}@dev"
    assert [c.branch for c in fresh.commits] == ["main", "dev"]
    pulled = Store(tmp_path / "p")
    assert remote(fresh, f"hf://{repo}@dev").pull(pulled).digest == two
    assert remote(fresh, f"hf://{repo}").pull(pulled).digest == one
    name = repo.split("/")[1]
    assert pulled.resolve(f"{name}:dev") == two and pulled.resolve(f"{name}:latest") == one
    assert main_head.ref == f"hf://{repo}@stable"

    remote(fresh, f"hf://{repo}@dev").push(store, two, "demo", "stable")  # moves the tag to dev's head
    assert remote(fresh, f"hf://{repo}@stable").pull(pulled, tag="moved:stable").digest == two

    with pytest.raises(InvalidReferenceError, match="not a branch"):
        remote(fresh, f"hf://{repo}@stable").push(store, one, "demo", "latest")


def test_sync_dispatch_with_hf_endpoint(
    fresh: HubServer, peft_folders: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI path: adapterkit.sync finds the plugin by scheme, the endpoint comes from HF_ENDPOINT."""
    monkeypatch.setenv("HF_ENDPOINT", fresh.endpoint)
    store = Store(tmp_path / "s")
    digest = store.add(peft_folders.lora2, "sync-demo:v7").digest
    repo = repo_name("sync")
    pushed = sync.push(store, "sync-demo:v7", f"hf://{repo}")
    assert (pushed.digest, pushed.ref) == (digest, f"hf://{repo}@v7")
    target = Store(tmp_path / "t")
    pulled = sync.pull(target, f"hf://{repo}@v7")
    assert (pulled.digest, pulled.ref) == (digest, f"{repo.split('/')[1]}:v7")
    renamed = sync.pull(target, f"hf://{repo}@v7", "mine:stable")
    assert (renamed.digest, renamed.ref, target.resolve("mine:stable")) == (digest, "mine:stable", digest)


def test_token_from_environment(
    fresh: HubServer, write_folder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s")
    digest = store.add(write_folder(tmp_path / "f"), "tok:latest").digest
    repo = repo_name("tok")
    fresh.require_token = "hf_test_secret"
    with pytest.raises(SyncError) as refused:
        remote(fresh, f"hf://{repo}").push(store, digest, "tok", "latest")
    assert "\n" not in str(refused.value) and "403" in str(refused.value)
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    remote(fresh, f"hf://{repo}").push(store, digest, "tok", "latest")
    assert len(fresh.commits) == 1


# -- the upload path of real pushes: Git LFS (and Xet, which this Hub lacks) ---------------------------------


def test_large_adapter_goes_through_lfs_and_comes_back(fresh: HubServer, write_folder: Any, tmp_path: Path) -> None:
    """A 21 MB adapter: preupload says lfs, the weights travel by LFS batch + basic PUT, the commit names them by
    an lfsFile line; the pull gets them from olah with the LFS sha256 as ETag; a later push of the same weights
    uploads nothing, and the server holds each LFS object once."""
    import httpx

    store = Store(tmp_path / "s")
    big = store.add(write_folder(tmp_path / "big", seed=1, dim=2048, r=64, modules=20), "big:v1").digest
    other = store.add(write_folder(tmp_path / "other", seed=2, dim=64, modules=2), "big:v2").digest
    weights = next(layer for layer in store.manifest(big)[1] if layer.title == "adapter_model.safetensors")
    assert weights.size >= 20_000_000
    sha = weights.digest.removeprefix("sha256:")
    repo = repo_name("large")
    hf = remote(fresh, f"hf://{repo}")
    pushed = hf.push(store, big, "big", "v1")

    [commit] = fresh.commits
    assert commit.lfs == {"adapter_model.safetensors": sha}
    assert commit.files["adapter_model.safetensors"] == 0  # not a byte of the weights inside the commit
    assert [(u.repo_id, u.oid, u.size) for u in fresh.lfs_uploads] == [(repo, sha, weights.size)]
    assert commit.received_bytes + weights.size == pushed.transferred_bytes
    assert ("POST", f"/{repo}.git/info/lfs/objects/batch") in fresh.requests
    assert not any("xet" in path for _, path in fresh.requests)

    # The pull side: olah serves the file with its LFS sha256 as ETag, as the Hub does, and the digest survives.
    head = httpx.head(f"{fresh.endpoint}/{repo}/resolve/main/adapter_model.safetensors", follow_redirects=False)
    etag = head.headers.get("x-linked-etag") or head.headers["etag"]
    assert etag.strip('"').removeprefix("W/").strip('"') == sha
    pulled = Store(tmp_path / "pulled")
    assert remote(fresh, f"hf://{repo}").pull(pulled).digest == big and pulled.verify().ok
    assert gets(fresh, "adapter_model.safetensors") == 1

    # Another adapter, then the big one again: its weights are a new commit's lfsFile, but the batch API
    # answers that the repository holds the object, so nothing is uploaded.
    hf.push(store, other, "big", "v2")
    fresh.reset()
    again = hf.push(store, big, "big", "v1")
    [recommit] = fresh.commits
    assert recommit.lfs == {"adapter_model.safetensors": sha}
    assert fresh.lfs_uploads == [] and not any(method == "PUT" for method, _ in fresh.requests)
    assert again.transferred_bytes > 0  # what adapterkit sends to the commit; LFS deduplicates below it
    objects = [p.name for p in fresh.lfs_objects(repo)]
    assert sorted(objects) == sorted(set(objects)) and objects.count(sha) == 1 and len(objects) == 2
    assert file_sha(fresh.files_at(repo)[MANIFEST_PATH]) == big


def test_lfs_batch_api(fresh: HubServer, write_folder: Any, tmp_path: Path) -> None:
    """The server's own LFS endpoints: download by oid, unsigned or wrong uploads refused, verify."""
    import httpx

    store = Store(tmp_path / "s")
    digest = store.add(write_folder(tmp_path / "f"), "x:latest").digest
    repo = repo_name("batch")
    remote(fresh, f"hf://{repo}").push(store, digest, "x", "latest")
    weights = next(layer for layer in store.manifest(digest)[1] if layer.title == "adapter_model.safetensors")
    oid, data = weights.digest.removeprefix("sha256:"), store.blobs.path(weights.digest).read_bytes()
    batch = f"{fresh.endpoint}/{repo}.git/info/lfs/objects/batch"
    missing = "0" * 64
    reply = httpx.post(
        batch,
        json={
            "operation": "download",
            "transfers": ["basic"],
            "objects": [{"oid": oid, "size": len(data)}, {"oid": missing, "size": 1}],
        },
    ).json()
    found, absent = reply["objects"]
    assert reply["transfer"] == "basic" and absent["error"]["code"] == 404
    assert httpx.get(found["actions"]["download"]["href"]).content == data

    new = b"new object" * 1000
    new_oid = hashlib.sha256(new).hexdigest()
    offer = httpx.post(
        batch,
        json={"operation": "upload", "objects": [{"oid": new_oid, "size": len(new)}, {"oid": oid, "size": len(data)}]},
    ).json()
    to_send, held = offer["objects"]
    assert "actions" not in held  # the repository holds it: nothing to send
    href = to_send["actions"]["upload"]["href"]
    assert httpx.put(href.split("?")[0], content=new).status_code == 403  # not signed
    assert httpx.put(href, content=new[:-1] + b"!").status_code == 400  # sha256 mismatch: not kept
    verify = to_send["actions"]["verify"]["href"]
    assert httpx.post(verify, json={"oid": new_oid, "size": len(new)}).status_code == 404
    assert httpx.put(href, content=new).status_code == 200
    assert httpx.post(verify, json={"oid": new_oid, "size": len(new)}).status_code == 200
    assert [(u.oid, u.size) for u in fresh.lfs_uploads] == [(oid, len(data)), (new_oid, len(new))]


def test_preupload_sends_large_files_to_lfs(fresh: HubServer) -> None:
    import httpx

    repo = repo_name("modes")
    fresh.create_repo(repo)
    files = [
        {"path": "adapter_model.safetensors", "size": 10, "sample": ""},
        {"path": "adapter_model.bin", "size": 10, "sample": ""},
        {"path": "notes.txt", "size": 10 * 1024 * 1024, "sample": ""},
        {"path": "big.txt", "size": 10 * 1024 * 1024 + 1, "sample": ""},
    ]
    reply = httpx.post(f"{fresh.endpoint}/api/models/{repo}/preupload/main", json={"files": files}).json()
    assert {f["path"]: f["uploadMode"] for f in reply["files"]} == {
        "adapter_model.safetensors": "lfs",
        "adapter_model.bin": "lfs",
        "notes.txt": "regular",
        "big.txt": "lfs",
    }


def test_xet_without_a_write_token_is_one_clear_line(
    fresh: HubServer, write_folder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_xet is installed (a huggingface_hub dependency): without HF_HUB_DISABLE_XET the client uploads by Xet,
    asks this Hub for a Xet write token and gets a 404. `adapterkit push` must say so in one line, with the way
    out, and change nothing; with HF_HUB_DISABLE_XET=1 the same push goes through LFS."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("hf_xet") is not None
    store = Store(tmp_path / "s")
    digest = store.add(write_folder(tmp_path / "f"), "x:v1").digest
    weights = next(layer for layer in store.manifest(digest)[1] if layer.title == "adapter_model.safetensors")
    repo = repo_name("xet")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_ENDPOINT": fresh.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "adapterkit", "--store", str(store.root), "push", "x:v1", f"hf://{repo}"]
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert lines[0].startswith("Error: ") and "no Xet" in lines[0] and "HF_HUB_DISABLE_XET=1" in lines[0], lines[0]
    assert ("GET", f"/api/models/{repo}/xet-write-token/main") in fresh.requests
    assert fresh.commits == [] and fresh.lfs_uploads == []
    done = subprocess.run(command, capture_output=True, text=True, env=env | {"HF_HUB_DISABLE_XET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [c.lfs for c in fresh.commits] == [{"adapter_model.safetensors": weights.digest.removeprefix("sha256:")}]


# -- pulling repositories adapterkit did not write ------------------------------------------------------------


def peft_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_pull_plain_peft_repo_at_tag_and_commit(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """Any PEFT repo: no manifest, imported like `adapterkit add`, at a tag, a commit sha and a branch."""
    repo = repo_name("plain")
    first = fresh.seed(repo, peft_files(peft_folders.lora), tags=("v1",))
    fresh.seed(repo, peft_files(peft_folders.lora2))
    reference = Store(tmp_path / "ref")
    one, two = reference.add(peft_folders.lora).digest, reference.add(peft_folders.lora2).digest

    store = Store(tmp_path / "s")
    name = repo.split("/")[1]
    at_tag = remote(fresh, f"hf://{repo}@v1").pull(store)
    assert (at_tag.digest, at_tag.ref) == (one, f"{name}:v1")
    at_commit = remote(fresh, f"hf://{repo}@{first}").pull(store)
    assert (at_commit.digest, at_commit.ref) == (one, f"{name}:{first}")
    assert remote(fresh, f"hf://{repo}").pull(store).digest == two
    assert store.verify().ok
    # PEFT's own safetensors layout is not canonical, so its LFS sha256 names no stored blob: fetched each time.
    assert gets(fresh, "adapter_model.safetensors") == 3

    legacy = repo_name("bin")
    fresh.seed(legacy, peft_files(peft_folders.lora_bin))
    assert remote(fresh, f"hf://{legacy}").pull(store).digest == one  # .bin weights, same tensors


def test_pull_plain_skips_blobs_the_store_has(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """Canonical weights on the Hub whose LFS sha256 the store already holds are not downloaded."""
    store = Store(tmp_path / "s")
    digest = store.add(peft_folders.lora, "mine:v1").digest
    repo = repo_name("canonical")
    fresh.seed(repo, peft_files(store.export("mine:v1", tmp_path / "exported").path))
    pulled = remote(fresh, f"hf://{repo}").pull(store, tag="theirs:v1")
    assert pulled.digest == digest
    weights = next(layer for layer in store.manifest(digest)[1] if layer.title == "adapter_model.safetensors")
    assert pulled.skipped_bytes == weights.size
    assert gets(fresh, "adapter_model.safetensors") == 0 and gets(fresh, "adapter_config.json") == 1


def test_pull_with_manifest_skips_blobs_the_store_has(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    a = Store(tmp_path / "a")
    digest = a.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name()
    remote(fresh, f"hf://{repo}").push(a, digest, "demo", "v1")
    fresh.reset()
    pulled = remote(fresh, f"hf://{repo}@v1").pull(a, tag="again:v1")
    assert pulled.digest == digest and a.resolve("again:v1") == digest
    assert pulled.transferred_bytes == len(a.manifests.read(digest))  # only the manifest itself
    assert gets(fresh, MANIFEST_PATH) == 1
    assert gets(fresh, METADATA_PATH) == gets(fresh, "adapter_model.safetensors") == gets(fresh, "README.md") == 0


def test_stale_manifest_falls_back_to_the_files(
    fresh: HubServer, peft_folders: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo edited after the push (config changed on the Hub): its files win, with a warning."""
    a = Store(tmp_path / "a")
    digest = a.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name("stale")
    remote(fresh, f"hf://{repo}").push(a, digest, "demo", "v1")
    edited = with_config(peft_folders.lora, tmp_path / "edited", lora_alpha=32)
    fresh.seed(repo, {"adapter_config.json": (edited / "adapter_config.json").read_bytes()})
    with pytest.warns(UserWarning, match="no longer matches"):
        pulled = remote(fresh, f"hf://{repo}").pull(Store(tmp_path / "b"))
    reference = Store(tmp_path / "ref")
    (tmp_path / "hub-files").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (tmp_path / "hub-files" / name).write_bytes(fresh.files_at(repo)[name])
    assert pulled.digest == reference.add(tmp_path / "hub-files").digest != digest

    # `adapterkit pull` shows the notice as one line, like its errors, not as Python's UserWarning display.
    from click.testing import CliRunner

    from adapterkit.cli import cli

    monkeypatch.setenv("HF_ENDPOINT", fresh.endpoint)
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "c"), "pull", f"hf://{repo}"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"Warning: hf://{repo}@[0-9a-f]{{40}}: adapter_config\.json no longer matches \.adapterkit/manifest\.json; "
        r"importing its files as a plain PEFT adapter\n",
        result.stderr,
    ), result.stderr


# -- errors and faults ----------------------------------------------------------------------------------------


def test_missing_repo_revision_and_files(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(ReferenceNotFoundError, match="no such model repository") as missing:
        remote(fresh, "hf://org/does-not-exist").pull(store)
    repo = repo_name("norev")
    fresh.seed(repo, peft_files(peft_folders.lora))
    with pytest.raises(ReferenceNotFoundError, match="no branch, tag or commit 'v9'") as no_rev:
        remote(fresh, f"hf://{repo}@v9").pull(store)
    # The repository exists; what it holds is not a PEFT adapter: the same error class `add` gives a folder.
    empty = repo_name("empty")
    fresh.create_repo(empty)
    with pytest.raises(AdapterFormatError, match="not a PEFT adapter repository") as not_peft:
        remote(fresh, f"hf://{empty}").pull(store)
    no_weights = repo_name("noweights")
    fresh.seed(no_weights, {"adapter_config.json": (peft_folders.lora / "adapter_config.json").read_bytes()})
    with pytest.raises(
        AdapterFormatError, match=r"no adapter_model\.safetensors \(or adapter_model\.bin\) in the repository"
    ) as no_weights_error:
        remote(fresh, f"hf://{no_weights}").pull(store)
    assert not isinstance(not_peft.value, ReferenceNotFoundError | SyncError)
    ia3 = repo_name("ia3")
    config = json.loads((peft_folders.lora / "adapter_config.json").read_text()) | {"peft_type": "IA3"}
    fresh.seed(ia3, {**peft_files(peft_folders.lora), "adapter_config.json": json.dumps(config).encode()})
    with pytest.raises(UnsupportedAdapterError, match=f"^hf://{ia3}@[0-9a-f]{{40}}: adapter_config.json") as ia3_error:
        remote(fresh, f"hf://{ia3}").pull(store)
    for exc in (missing, no_rev, not_peft, no_weights_error, ia3_error):
        assert "\n" not in str(exc.value) and "adapterkit-hf-" not in str(exc.value)
    assert not store.initialised()


def test_unreachable_endpoint_is_a_sync_error(tmp_path: Path, write_folder: Any) -> None:
    store = Store(tmp_path / "s")
    digest = store.add(write_folder(tmp_path / "f"), "x:latest").digest
    dead = HubRemote("hf://org/x", endpoint="http://127.0.0.1:9")
    with pytest.raises(SyncError, match=r"127\.0\.0\.1:9") as push_error:
        dead.push(store, digest, "x", "latest")
    with pytest.raises(SyncError) as pull_error:
        dead.pull(store)
    assert "\n" not in str(push_error.value) + str(pull_error.value)


def test_pull_corrupted_bytes(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """Bytes unlike the Hub's record (LFS sha256, git blob id): IntegrityError, nothing stored, a re-run works."""
    a = Store(tmp_path / "a")
    digest = a.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name("corrupt")
    remote(fresh, f"hf://{repo}").push(a, digest, "demo", "v1")
    plain = repo_name("corrupt-plain")
    fresh.seed(plain, peft_files(peft_folders.lora))
    b = Store(tmp_path / "b")
    b.add(peft_folders.lora2, "other:latest")
    before = b.refs_by_digest()
    for url, filename in (
        (f"hf://{repo}", "adapter_model.safetensors"),
        (f"hf://{repo}", MANIFEST_PATH),
        (f"hf://{plain}", "adapter_config.json"),
    ):
        fault = fresh.fault("corrupt", filename)
        with pytest.raises(IntegrityError, match="does not match the Hub's") as caught:
            remote(fresh, url).pull(b)
        assert fault.hits == 1 and "\n" not in str(caught.value)
        assert_untouched(b, before)
    assert remote(fresh, f"hf://{repo}").pull(b).digest == digest
    assert remote(fresh, f"hf://{plain}").pull(b).digest == digest  # PEFT's files of the same adapter
    assert b.verify().ok


def test_pull_dropped_connection(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """A connection cut mid-body: the client resumes once; cut every time, a clear SyncError and a clean store."""
    a = Store(tmp_path / "a")
    digest = a.add(peft_folders.lora, "demo:v1").digest
    repo = repo_name("drop")
    remote(fresh, f"hf://{repo}").push(a, digest, "demo", "v1")
    b = Store(tmp_path / "b")
    once = fresh.fault("drop", "adapter_model.safetensors")
    assert remote(fresh, f"hf://{repo}").pull(b).digest == digest
    assert once.hits == 1 and b.verify().ok

    c = Store(tmp_path / "c")
    always = fresh.fault("drop", "adapter_model.safetensors", times=100)
    with pytest.raises(SyncError, match=r"downloading adapter_model\.safetensors failed") as caught:
        remote(fresh, f"hf://{repo}").pull(c)
    assert always.hits > 1 and "\n" not in str(caught.value)
    assert not c.initialised() and c.verify().ok
    fresh.reset()
    assert remote(fresh, f"hf://{repo}").pull(c).digest == digest


def test_push_commit_failure(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """A 500 on the commit: SyncError, the repo unchanged, no Hub tag; the re-run completes."""
    store = Store(tmp_path / "s")
    one = store.add(peft_folders.lora, "demo:v1").digest
    two = store.add(peft_folders.lora2, "demo:v2").digest
    repo = repo_name("fail")
    hf = remote(fresh, f"hf://{repo}")
    hf.push(store, one, "demo", "v1")
    before = fresh.files_at(repo)
    fault = fresh.fault("status", "/commit/main", method="POST", status=500)
    with pytest.raises(SyncError, match=r"commit failed .*HTTP 500") as caught:
        hf.push(store, two, "demo", "v2")
    assert fault.hits == 1 and "\n" not in str(caught.value)
    assert fresh.files_at(repo) == before and len(fresh.commits) == 1
    assert "v2" not in {t.name for t in hf.api.list_repo_refs(repo).tags}
    hf.push(store, two, "demo", "v2")
    assert file_sha(fresh.files_at(repo, "v2")[MANIFEST_PATH]) == two


def cli_push(hub: HubServer, store: Store, ref: str, url: str, tmp_path: Path) -> subprocess.Popen[str]:
    """``adapterkit push REF URL`` in a process of its own, against ``hub``, as a user's shell would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    env |= {"PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "adapterkit", "--store", str(store.root), "push", ref, url]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_push_race_is_detected_not_overwritten(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """Another process pushes between our read of the branch and our commit: RemoteConflictError, theirs intact."""
    store, other = Store(tmp_path / "s"), Store(tmp_path / "other")
    ours = store.add(peft_folders.lora, "demo:ours").digest
    theirs = other.add(peft_folders.lora2, "demo:theirs").digest
    repo = repo_name("race")
    hf = remote(fresh, f"hf://{repo}")
    hf.push(store, ours, "demo", "latest")  # the repo exists; both pushes below start from this head
    results: list[tuple[int, str]] = []

    def other_push() -> None:  # runs in the server while it holds our commit back; theirs goes through
        process = cli_push(fresh, other, "demo:theirs", f"hf://{repo}", tmp_path)
        _, err = process.communicate(timeout=300)
        results.append((process.returncode, err))

    fresh.fault("call", "/commit/main", method="POST", callback=other_push)
    mine = store.add(peft_folders.lora_mlp, "demo:mine").digest
    with pytest.raises(RemoteConflictError, match="moved while pushing") as caught:
        hf.push(store, mine, "demo", "mine")
    assert results == [(0, "")], results
    assert "\n" not in str(caught.value)
    assert file_sha(fresh.files_at(repo)[MANIFEST_PATH]) == theirs
    assert "mine" not in {t.name for t in hf.api.list_repo_refs(repo).tags}
    hf.push(store, mine, "demo", "mine")  # re-run: reads the new head, commits on top of it
    assert file_sha(fresh.files_at(repo, "mine")[MANIFEST_PATH]) == mine
    assert file_sha(fresh.files_at(repo, "theirs")[MANIFEST_PATH]) == theirs


@pytest.mark.slow
def test_concurrent_pushes_one_repo(fresh: HubServer, write_folder: Any, tmp_path: Path) -> None:
    """Four `adapterkit push` processes race for one branch. The server holds each commit until all four have
    arrived, so all four read the same head: one wins, three get the conflict, the branch holds one whole adapter."""
    stores = [Store(tmp_path / f"s{i}") for i in range(4)]
    digests = [s.add(write_folder(tmp_path / f"f{i}", seed=i), f"c:v{i}").digest for i, s in enumerate(stores)]
    repo = repo_name("concurrent")
    fresh.create_repo(repo)
    arrived = threading.Barrier(len(stores), timeout=120)
    fresh.fault("call", "/commit/main", method="POST", times=len(stores), callback=arrived.wait)
    processes = [cli_push(fresh, s, f"c:v{i}", f"hf://{repo}", tmp_path) for i, s in enumerate(stores)]
    outcomes = {}
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=300)
        outcomes[i] = (process.returncode, out, err)
    won = [i for i, (code, _, _) in outcomes.items() if code == 0]
    lost = [i for i, (code, _, err) in outcomes.items() if code == 1 and "moved while pushing" in err]
    assert len(won) == 1 and len(lost) == 3, outcomes
    assert all(len(outcomes[i][2].strip().splitlines()) == 1 for i in lost)  # one line each, no traceback
    assert [c.repo_id for c in fresh.commits] == [repo]
    files = fresh.files_at(repo)
    assert file_sha(files[MANIFEST_PATH]) == digests[won[0]]
    # The files at the head are exactly the ones its manifest names: no mix of two pushes.
    pulled = Store(tmp_path / "p")
    assert remote(fresh, f"hf://{repo}").pull(pulled).digest == digests[won[0]]
    assert pulled.verify().ok


# -- the model card -------------------------------------------------------------------------------------------


def card_of(hub: HubServer, repo: str) -> tuple[dict[str, Any], str]:
    import yaml

    text = hub.files_at(repo)["README.md"].decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_model_card(fresh: HubServer, peft_folders: Any, tmp_path: Path) -> None:
    """library_name peft, base_model only when it is a Hub id, tags lora + adapterkit; the Hub's YAML check passes."""
    store = Store(tmp_path / "s")
    hub_base = with_config(peft_folders.lora, tmp_path / "hub-base", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    local_base = with_config(peft_folders.lora, tmp_path / "local-base", base_model_name_or_path=str(tmp_path))
    with_hub_id = store.add(hub_base, "card:hub").digest
    with_path = store.add(local_base, "card:local").digest
    repo_hub, repo_local = repo_name("card"), repo_name("card")
    remote(fresh, f"hf://{repo_hub}").push(store, with_hub_id, "card", "latest")
    remote(fresh, f"hf://{repo_local}").push(store, with_path, "card", "latest")
    assert [c.repo_id for c in fresh.commits] == [repo_hub, repo_local]  # validate-yaml accepted both

    data, body = card_of(fresh, repo_hub)
    assert data["library_name"] == "peft" and data["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "pipeline_tag" not in data  # PEFT's LoraConfig here has no task_type to derive it from
    assert {"lora", "adapterkit", "base_model:adapter:meta-llama/Llama-3.2-1B", "transformers"} <= set(data["tags"])
    assert with_hub_id in body and 'PeftModel.from_pretrained(base, "' + repo_hub + '")' in body
    assert "Model Card for Model ID" in body  # PEFT's own card text is kept

    data, _ = card_of(fresh, repo_local)
    assert "base_model" not in data and not any(t.startswith("base_model:") for t in data["tags"])
    assert data["library_name"] == "peft" and {"lora", "adapterkit"} <= set(data["tags"])


def test_card_refused_by_the_hub(fresh: HubServer, write_folder: Any, tmp_path: Path) -> None:
    """The adapter's own front matter is kept, so the Hub may refuse it: a one-line SyncError, nothing committed."""
    store = Store(tmp_path / "s")
    folder = write_folder(tmp_path / "f", readme="---\nlicense: not-a-license\n---\n# mine\n")
    digest = store.add(folder, "bad:latest").digest
    with pytest.raises(SyncError, match="refused the model card") as caught:
        remote(fresh, f"hf://{repo_name('bad')}").push(store, digest, "bad", "latest")
    assert "\n" not in str(caught.value) and "not-a-license" in str(caught.value) and fresh.commits == []


LLAMA_STYLE_CARD = """---
language:
- en
pipeline_tag: text-generation
tags:
- facebook
- meta
- llama
license: llama3
extra_gated_prompt: >-
  ### META LLAMA 3 COMMUNITY LICENSE AGREEMENT
extra_gated_fields:
  First Name: text
  Country: country
  I accept the terms: checkbox
model-index:
- name: my-model
  results:
  - task:
      type: text-generation
    dataset:
      name: some-benchmark
      type: org/benchmark
    metrics:
    - type: accuracy
      value: 0.5
---
# A card
"""


def test_validate_yaml_accepts_what_the_hub_accepts(fresh: HubServer, peft_folders: Any) -> None:
    """The test Hub's card check must never refuse a card the real Hub takes (hub_server.VALIDATED_RULES says what
    it checks): every license id the Hub lists, alone or in a list; ``other`` with its name and link; a Llama 3
    style card with gating fields and eval results; PEFT's own cards, from PEFT here and from the corpus of cards
    found in the wild; adapterkit's card for each of them. Cards that break a checked rule are refused."""
    from helpers import corpus_dir
    from hub_server import LICENSES
    from huggingface_hub import HfApi

    api = HfApi(endpoint=fresh.endpoint)
    # Licenses common on the Hub, listed here independently of the server's list, then the server's whole list.
    common = ["apache-2.0", "mit", "gpl-3.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "llama2", "llama3.1", "gemma"]
    common += ["openrail++", "creativeml-openrail-m", "bigscience-bloom-rail-1.0", "afl-3.0", "unknown", "other"]
    ids = common + sorted(LICENSES)
    accepted = [f"---\nlicense: {license_id}\nlibrary_name: peft\n---\n" for license_id in ids]
    accepted += [
        "---\nlicense:\n- mit\n- apache-2.0\n---\n",
        "---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE\n---\n",
        "---\nbase_model:\n- org/one\n- org/two\ndatasets:\n- org/data\n---\n",
        "# no front matter at all\n",
        LLAMA_STYLE_CARD,
        (peft_folders.lora / "README.md").read_text(),
    ]
    wild = sorted((corpus_dir() / "cards").glob("*README.md"))
    assert len(wild) == 5 or not corpus_dir().is_dir()  # where the corpus is absent, tests/test_corpus.py skips
    for path in wild:
        text = path.read_bytes()
        if b"base_model: /" not in text:  # one names a local path as its base, which the Hub refuses
            accepted.append(text.decode())
        accepted.append(model_card({"base_model": None}, "sha256:" + "0" * 64, "org/repo", text).decode())
    for card in accepted:
        api._validate_yaml(card)  # what create_commit calls for a README.md; ValueError when refused
    refused = {
        "license: not-a-license": "license",
        "license: [mit, nope]": "license",
        "base_model: /home/me/model": "base_model",
        "base_model: [org/ok, ./local]": "base_model",
        "tags: lora": "tags",
        "[1, 2]": "mapping",
        "key: [unclosed": "YAML",
    }
    for front, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            api._validate_yaml(f"---\n{front}\n---\n")


def test_model_card_is_stable_across_pushes() -> None:
    """A card pulled from the Hub and pushed again keeps one adapterkit section; no README gives a generated body."""
    metadata = {"base_model": {"name": "org/base"}, "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj"]}
    first = model_card(metadata, "sha256:" + "1" * 64, "org/repo", b"---\nlicense: mit\ntags: [mine]\n---\n# Mine\n")
    second = model_card(metadata, "sha256:" + "2" * 64, "org/repo", first)
    text = second.decode()
    assert text.count("adapterkit:begin") == 1 and "1" * 64 not in text and "2" * 64 in text
    assert "license: mit" in text and "- mine" in text and "# Mine" in text
    assert model_card(metadata, "sha256:" + "2" * 64, "org/repo", second) == second
    assert "pipeline_tag: text-generation" in text and "AutoModelForCausalLM" in text
    generated = model_card({"base_model": None}, "sha256:" + "3" * 64, "org/repo", None).decode()
    assert generated.startswith("---\nlibrary_name: peft\n") and "# repo" in generated
