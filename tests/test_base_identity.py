"""One base-identity rule for compose, its dry run, inspect, merge and attach (adapterkit.base_identity).

Each mark (structure fingerprint, content digest, name) is compared wherever both sides carry it,
so leaving a mark out can no longer let an adapter past the check; different names with equal
fingerprints warn; a blend never records one parent's name with another's fingerprint.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import save_base, save_lora, tiny_llama

from adapterkit import compose, inspect, plan_compose
from adapterkit.adapter.model import Adapter
from adapterkit.base_identity import BaseIdentity, reconcile, repo_id
from adapterkit.cli import cli
from adapterkit.errors import BaseModelError, IncompatibleAdaptersError
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.stacking import attach
from adapterkit.merging.streamed import merge

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("identity")
    model = tiny_llama(seed=0)
    save_base(model, root / "base")
    save_base(tiny_llama(seed=5), root / "tuned")  # same structure, other weights: a "fine-tune"
    return {
        "root": root,
        "model": model,
        "base": root / "base",
        "tuned": root / "tuned",
        "a": save_lora(model, root / "a", seed=1),
        "b": save_lora(model, root / "b", seed=2, r=4),
    }


def marked(path: Path, *, name: str | None, fp: str | None = None, content: str | None = None) -> Adapter:
    """The adapter at ``path`` as if stored with these base marks (``name`` also goes into its config)."""
    adapter = read_adapter(path)
    adapter.config = {**adapter.config, "base_model_name_or_path": name}
    entry: dict[str, Any] = {"name": name, "revision": None, "structure_digest": fp}
    if content is not None:
        entry["content_digest"] = content
    adapter.metadata = {"base_model": entry if (name or fp) else None}
    return adapter


def test_a_missing_fingerprint_no_longer_lets_different_names_through(world: dict[str, Any]) -> None:
    """On main, one fingerprint on one side made names irrelevant: org/a and org/b blended without --force."""
    unprinted = marked(world["a"], name="org/model-a")
    printed = marked(world["b"], name="org/model-b", fp=FP_A)
    for function in (compose, plan_compose, inspect):
        with pytest.raises(IncompatibleAdaptersError, match=r"org/model-a, org/model-b.*--force"):
            function([unprinted, printed], [1.0, 1.0])
    assert compose([unprinted, printed], [1.0, 1.0], force=True).modules


def test_a_blend_never_mixes_one_parents_name_with_anothers_fingerprint(world: dict[str, Any]) -> None:
    """Nothing to compare (a fingerprint alone, a name alone): accepted, recording one parent's entry whole."""
    printed = marked(world["a"], name=None, fp=FP_A)
    named = marked(world["b"], name="org/model-b")
    blended = compose([named, printed], [1.0, 1.0])
    assert blended.metadata["base_model"] == {"name": None, "revision": None, "structure_digest": FP_A}
    # Both agree on everything they carry: the fuller entry is taken, and it is one parent's own.
    both = marked(world["b"], name="org/model-b", fp=FP_A)
    assert compose([named, both], [1.0, 1.0]).metadata["base_model"] == both.metadata["base_model"]


def test_equal_fingerprints_with_different_names_warn_once_naming_both(world: dict[str, Any]) -> None:
    first = marked(world["a"], name="meta-llama/Llama-2-7b-hf", fp=FP_A)
    second = marked(world["b"], name="meta-llama/Llama-2-7b-chat-hf", fp=FP_A)
    third = marked(world["b"], name="meta-llama/Llama-2-7b-chat-hf", fp=FP_A)
    for function in (compose, plan_compose):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            function([first, second, third], [1.0, 0.5, 0.5])
        messages = [str(w.message) for w in caught if str(w.message).startswith("adapterkit: ")]
        assert len(messages) == 1, messages
        assert "'meta-llama/Llama-2-7b-hf'" in messages[0] and "'meta-llama/Llama-2-7b-chat-hf'" in messages[0]


def test_different_content_digests_are_refused_unless_forced(world: dict[str, Any]) -> None:
    first = marked(world["a"], name="org/m", fp=FP_A, content="sha256:" + "1" * 64)
    second = marked(world["b"], name="org/m", fp=FP_A, content="sha256:" + "2" * 64)
    for function in (compose, plan_compose, inspect):
        with pytest.raises(IncompatibleAdaptersError, match=r"different weights.*--force"):
            function([first, second], [1.0, 1.0])
    assert compose([first, second], [1.0, 1.0], force=True).modules


def test_local_paths_are_never_held_against_repository_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    assert repo_id("Org/Model-7B") == "org/model-7b" and repo_id("gpt2") == "gpt2"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "base").mkdir(parents=True)  # from_pretrained("demo/base") records "demo/base"
    assert repo_id("demo/base") is None and repo_id("demo/other") == "demo/other"
    for path in ("/models/llama", "./base", "../base", "~/llama", "C:\\models\\llama", "a/b/c", None, ""):
        assert repo_id(path) is None, path
    sides = [BaseIdentity("x", name="/srv/models/llama"), BaseIdentity("y", name="meta-llama/Llama-2-7b-hf")]
    assert reconcile(sides) == ({"name": "/srv/models/llama", "revision": None, "structure_digest": None}, [])
    with pytest.raises(IncompatibleAdaptersError):
        reconcile([BaseIdentity("x", name="org/a"), BaseIdentity("y", name="ORG/B")])
    assert reconcile([BaseIdentity("x", name="org/a"), BaseIdentity("y", name="ORG/A")])[1] == []


def _base_named(world: dict[str, Any], name: str, tmp_path: Path) -> Path:
    base = Path(shutil.copytree(world["base"], tmp_path / "named-base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": name}))
    return base


def test_merge_applies_the_same_rule_to_the_base_folder(world: dict[str, Any], tmp_path: Path) -> None:
    base = _base_named(world, "org/model-a", tmp_path)
    other = marked(world["a"], name="org/model-b")  # no fingerprint: the names are all there is
    with pytest.raises(BaseModelError, match=r"'org/model-b' but .* is 'org/model-a'.*--force"):
        merge([other], None, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge([other], None, base, tmp_path / "out", force=True)
    # Between the adapters too, as compose: main skipped names as soon as one adapter had a fingerprint.
    from adapterkit.base_model import fingerprint

    structure = fingerprint(world["base"]).structure_digest
    pair = [marked(world["a"], name="org/x"), marked(world["b"], name="org/y", fp=structure)]
    with pytest.raises(IncompatibleAdaptersError, match="org/x, org/y"):
        merge(pair, None, world["base"], tmp_path / "out2")
    # Same structure, another name: merged, with the warning in the report.
    same = marked(world["a"], name="org/model-b", fp=structure)
    report = merge([same], None, base, tmp_path / "out3")
    assert any("'org/model-b'" in w and "'org/model-a'" in w for w in report.warnings)


def test_merge_compares_content_digests_when_an_adapter_carries_one(world: dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    store = tmp_path / "store"
    for name, base in (("on/base", world["base"]), ("on/tuned", world["tuned"])):
        result = CliRunner().invoke(
            cli, ["--store", str(store), "add", str(world["a"]), "-t", name, "--base", str(base), "--content"]
        )
        assert result.exit_code == 0, result.output
    from adapterkit import Store

    tuned = Store(store).get("on/tuned")
    assert tuned.metadata["base_model"]["content_digest"].startswith("sha256:")
    with pytest.raises(BaseModelError, match=r"different weights.*--force"):
        merge([tuned], None, world["base"], tmp_path / "out")
    merge([Store(store).get("on/base")], None, world["base"], tmp_path / "out")  # its own base: fine
    # compose sees the same disagreement between the two adapters.
    result = CliRunner().invoke(cli, ["--store", str(store), "compose", "on/base", "on/tuned", "-t", "x/y"])
    assert result.exit_code == 1 and "different weights" in result.stderr


def test_attach_checks_the_adapters_against_the_models_name(world: dict[str, Any]) -> None:
    model = copy.deepcopy(world["model"])
    model.config._name_or_path = "org/model-a"
    other = marked(world["a"], name="org/model-b")
    with pytest.raises(BaseModelError, match="'org/model-b' but the model is 'org/model-a'"):
        attach(model, [other])
    assert attach(model, [other], force=True) is not None
    local = copy.deepcopy(world["model"])
    local.config._name_or_path = str(world["base"])  # loaded from a folder: nothing to hold against a name
    assert attach(local, [other]) is not None
    pair = [marked(world["a"], name="org/x"), marked(world["b"], name="org/y", fp=FP_A)]
    with pytest.raises(IncompatibleAdaptersError, match="org/x, org/y"):
        attach(copy.deepcopy(world["model"]), pair, [0.5, 0.5])


def test_the_cli_prints_the_doubt_as_one_warning_line(world: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    for folder, ref in ((world["a"], "x/a"), (world["b"], "x/b")):
        assert CliRunner().invoke(cli, ["--store", str(store), "add", str(folder), "-t", ref]).exit_code == 0
    from adapterkit import Store

    opened = Store(store)
    for ref, name in (("x/a", "org/base"), ("x/b", "org/base-chat")):  # rewrite as stored with --base
        adapter = opened.get(ref)
        adapter.config = {**adapter.config, "base_model_name_or_path": name}
        adapter.metadata = {"base_model": {"name": name, "revision": None, "structure_digest": FP_A}}
        opened.put(adapter, ref)
    result = CliRunner().invoke(cli, ["--store", str(store), "compose", "x/a", "x/b", "-t", "x/ab"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: adapter 1 (sha256:")
    assert "'org/base'" in lines[0] and "'org/base-chat'" in lines[0]
