"""What a new user tried at the command line: hostile arguments to every command, and the small promises.

The sweep runs every command with arguments a user gets wrong (missing paths, bad references,
absurd numbers, unknown devices, memory:// URLs...), with and without ``--json``, and asserts
that none of them prints a traceback: a failure is one ``Error:`` line (exit 1) or a usage error
(exit 2), and under ``--json`` a ``{"error": {"type", "message"}}`` document on stdout.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import write_adapter_folder
from helpers import save_base, save_lora, tiny_gpt2, tiny_llama

from adapterkit.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("promises")
    base = tiny_llama()
    paths = {
        "root": root,
        "base": save_base(base, root / "base", max_shard_size="40KB"),
        "a": save_lora(base, root / "a", seed=1),
        "b": save_lora(base, root / "b", seed=2, r=4, target_modules=["q_proj", "down_proj"]),
        "file": root / "file.txt",
        "full": root / "full",
        "empty": root / "empty",
    }
    paths["file"].write_text("not a folder")
    paths["full"].mkdir()
    (paths["full"] / "keep.txt").write_text("mine")
    paths["empty"].mkdir()
    # An adapter with a NaN in one factor, and a legacy .bin written by pickle itself (protocol 4).
    nan = write_adapter_folder(root / "nan", modules=2, dim=8, r=2)
    raw = bytearray((nan / "adapter_model.safetensors").read_bytes())
    raw[-4:] = np.array([np.nan], dtype="<f4").tobytes()  # the last element of the last tensor
    (nan / "adapter_model.safetensors").write_bytes(bytes(raw))
    paths["nan"] = nan
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with (pickled / "adapter_model.bin").open("wb") as fh:
        pickle.dump({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}, fh, protocol=4)
    paths["pickled"] = pickled
    return paths


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def ok(*args: str | Path) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


@pytest.fixture
def store(tmp_path: Path, world: dict[str, Path]) -> Path:
    path = tmp_path / "store"
    ok("--store", path, "add", world["a"], "--tag", "team/a:v1", "--base", world["base"])
    ok("--store", path, "add", world["b"], "--tag", "team/b")
    return path


class Fine(list):  # type: ignore[type-arg]
    """Arguments that look odd but are valid: the command must succeed."""


def hostile(world: dict[str, Path], tmp: Path) -> dict[str, list[list[str | Path]]]:
    """Per command, argument lists a user gets wrong. Every command of the CLI must be here."""
    nope = tmp / "nope"
    out = tmp / "out"
    merge = ["team/a:v1", "--base", world["base"], "--out"]
    return {
        "add": [
            [nope, "-t", "x"],
            [world["file"], "-t", "x"],
            [world["a"], "-t", "Bad/Name"],
            [world["a"], "-t", "x", "--base", nope],
            [world["a"], "-t", "x", "--base", world["file"]],
            [world["a"], "-t", "x", "--content"],
            [world["nan"], "-t", "x"],
            [world["pickled"], "-t", "x"],
        ],
        "list": [Fine(["[unclosed"]), Fine(["*" * 300])],
        "show": [["nope"], ["sha256:zz"], ["../x"], [""], ["a" * 300], ["sha256:" + "0" * 64], ["Team/A"]],
        "tag": [["nope", "x"], ["team/a:v1", "Bad"], ["team/a:v1", "sha256:abcd"], ["team/a:v1", "a:-x"]],
        "rm": [["nope"], ["team/a:v1", "nope"], ["sha256:abcd"], ["../x"]],
        "log": [["nope"], ["Bad/Name"], ["sha256:abcd"], ["x@sha256:" + "0" * 64]],
        "export": [
            ["nope", out],
            ["team/a:v1", world["file"]],
            ["team/a:v1", world["full"]],
            ["team/a:v1", out, "--format", "gguf"],
            ["team/a:v1", out, "--format", "gguf", "--base", nope],
            ["team/a:v1", out, "--format", "gguf", "--base", world["file"]],
            ["team/a:v1", out, "--format", "gguf", "--base", world["base"], "--dtype", "f8"],
            ["team/a:v1", world["file"], "--format", "gguf", "--base", world["base"]],
            ["team/a:v1", out, "--base", world["base"]],
            ["team/a:v1", out, "--pad-rank", "0"],
            ["team/a:v1", out, "--pad-rank", "2"],
            ["team/a:v1", out, "--pad-rank", "100000"],
            ["team/a:v1", out, "--format", "gguf", "--base", world["base"], "--pad-rank", "16"],
        ],
        "check": [
            ["nope", "--base", world["base"]],
            ["team/a:v1", "--base", nope],
            ["team/a:v1", "--base", world["file"]],
            ["team/a:v1", "--base", world["empty"]],
            ["team/a:v1"],
            Fine(["team/a:v1", "--base", world["base"]]),
        ],
        "verify": [["--full", "--bogus"]],
        "gc": [["--grace", "-1h"], ["--grace", "soon"], ["--grace", ""]],
        "fingerprint": [[nope], [world["file"]], [world["empty"]]],
        "compose": [
            ["team/a:v1", "-w", "nan", "-t", "x"],
            ["team/a:v1", "-w", "1,2", "-t", "x"],
            ["team/a:v1", "-w", "1e308", "-s", "svd", "-t", "x"],
            ["team/a:v1", "team/b", "-w", "1e39,1", "-s", "ties", "-t", "x"],
            ["team/a:v1", "-w", "-1e308", "-s", "dare_linear", "-t", "x"],
            ["team/a:v1", "-s", "nope", "-t", "x"],
            ["team/a:v1", "-s", "svd", "--rank", "-1", "-t", "x"],
            ["team/a:v1", "-s", "svd", "--energy", "2", "-t", "x"],
            ["team/a:v1", "-s", "svd", "--rank", "2", "--energy", "0.5", "-t", "x"],
            ["team/a:v1", "-s", "ties", "--density", "0", "-t", "x"],
            ["team/a:v1", "--device", "foo", "-t", "x"],
            ["team/a:v1", "team/b", "-s", "svd", "--device", "foo", "-t", "x"],
            Fine(["team/a:v1", "team/b", "-s", "ties", "--energy", "0.9", "--dry-run"]),
            Fine(["team/a:v1", "team/b", "-s", "magnitude_prune", "--energy", "0.5", "--dry-run"]),
            ["team/a:v1", "--device", "cuda:7", "-t", "x"],
            ["team/a:v1", "-s", "svd", "--device", "meta", "--dry-run"],
            ["team/a:v1", "-s", "svd", "--param", "rank=abc", "-t", "x"],
            ["team/a:v1", "--param", "novalue", "-t", "x"],
            ["team/a:v1", "team/a:v1", "-w", "1,-1", "-s", "svd", "-t", "x"],
            ["team/a:v1", "-w", "0", "-t", "x"],
            ["team/a:v1", "-t", "sha256:abcd"],
            ["team/a:v1"],
        ],
        "merge": [
            ["team/a:v1", "--base", nope, "--out", out],
            [*merge, tmp / "missing" / "parent" / "x"],
            [*merge, out, "-w", "1e39"],
            [*merge, out, "-w", "inf"],
            [*merge, out, "--dtype", "int8"],
            [*merge, out, "--device", "foo"],
            [*merge, out, "--device", "cuda"],
            [*merge, world["full"]],
            [*merge, out, "--dry-run", "-w", "nan"],
        ],
        "inspect": [["nope"], ["team/a:v1", "-w", "1e308"], ["team/a:v1", "--plot", world["full"]]],
        "push": [
            ["team/a:v1", "memory://x"],
            ["team/a:v1", "xyz://x"],
            ["sha256:abcd", tmp],
            ["team/a:v1", world["full"]],
        ],
        "pull": [["memory://x/a"], [f"{nope}/a"], ["xyz://a"], ["hf://not a repo"], [world["root"]]],
        "plugins": [["--bogus"]],
        "demo": [["--workdir", world["full"]], ["--workdir", world["file"]]],
        "extract": [
            ["--base", world["file"], "--tuned", world["file"], "--rank", "4", "--dry-run"],
            ["--base", world["full"], "--tuned", world["full"], "--rank", "0", "--dry-run"],
            ["--base", world["file"], "--tuned", world["file"], "--energy", "2", "--out", world["file"]],
        ],
    }


def _failure_is_one_line(result: Result, as_json: bool) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        return
    assert result.exit_code in (1, 2), result.exit_code
    if as_json:
        document = json.loads(result.stdout)
        assert set(document) == {"error"} and set(document["error"]) == {"type", "message"}, document
        assert document["error"]["message"] and "\n" not in document["error"]["message"]
        assert "Error:" not in result.stderr
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr


def test_every_command_meets_hostile_arguments_without_a_traceback(
    store: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    cases = hostile(world, tmp_path)
    assert set(cases) == set(cli.commands), "add hostile arguments for every command"
    for command, argument_lists in cases.items():
        for arguments in argument_lists:
            for as_json in (False, True):
                extra = ["--json"] if as_json else []
                result = invoke("--store", store, command, *arguments, *extra)
                _failure_is_one_line(result, as_json)
                # refused, not shrugged off (a few odd-looking arguments are fine: they are marked so)
                assert (result.exit_code == 0) == isinstance(arguments, Fine), (command, arguments, result.output)


def test_json_errors_are_documents_on_stdout_with_the_exit_code_unchanged(store: Path) -> None:
    result = invoke("--store", store, "--json", "show", "team/nope")
    assert result.exit_code == 1 and result.stderr == ""
    assert json.loads(result.stdout) == {
        "error": {"type": "ReferenceNotFoundError", "message": f"no adapter team/nope:latest in {store}"}
    }
    usage = invoke("--store", store, "gc", "--grace", "soon", "--json")
    assert usage.exit_code == 2 and json.loads(usage.stdout)["error"]["type"] == "BadParameter"
    unknown = invoke("--json", "no-such-command")
    assert unknown.exit_code == 2 and json.loads(unknown.stdout)["error"]["type"] == "NoSuchCommand"
    plain = invoke("--store", store, "show", "team/nope")
    assert plain.stdout == "" and plain.stderr.startswith("Error: no adapter")


def test_rank_and_energy_together_are_a_usage_error(store: Path) -> None:
    both = ["-s", "svd", "--rank", "2", "--energy", "0.9", "--dry-run"]
    result = invoke("--store", store, "compose", "team/a:v1", "team/b", *both)
    assert result.exit_code == 2 and "--rank and --energy" in result.stderr
    from adapterkit import Store, compose
    from adapterkit.errors import CompositionError

    parents = [Store(store).get("team/a:v1")]
    with pytest.raises(CompositionError, match="give 'rank' or 'energy', not both"):
        compose(parents, None, "svd", rank=2, energy=0.9)


def test_a_dense_energy_dry_run_prints_its_plan(store: Path) -> None:
    for strategy in ("ties", "dare_linear", "magnitude_prune"):
        text = ok("--store", store, "compose", "team/a:v1", "team/b", "-s", strategy, "--energy", "0.9", "--dry-run")
        assert "output ranks unknown until the dense deltas are formed" in text
        assert "output: unknown until the ranks are" in text and "cost:   about" in text


def test_tag_and_add_say_which_adapter_a_moved_ref_named(store: Path, world: dict[str, Path]) -> None:
    a = json.loads(ok("--store", store, "show", "team/a:v1", "--json"))["digest"]
    b = json.loads(ok("--store", store, "show", "team/b", "--json"))["digest"]
    assert ok("--store", store, "tag", "team/a:v1", "team/b") == f"team/b -> {a} (was {b})\n"
    assert ok("--store", store, "tag", "team/a:v1", "team/b") == f"team/b -> {a}\n"  # nothing moved
    added = ok("--store", store, "add", world["b"], "-t", "team/b")
    assert added.startswith(f"team/b:latest {b} (0 B new") and added.endswith(f" (was {a})\n")
    assert json.loads(ok("--store", store, "tag", "team/b", "team/a:v1", "--json"))["previous"] == a


def test_gc_says_how_many_unreachable_objects_the_grace_period_kept(store: Path) -> None:
    ok("--store", store, "rm", "team/b")
    text = ok("--store", store, "gc")
    assert text.startswith("removed 0 files, 0 B\nkept ")
    assert re.search(r"kept [1-9]\d* unreachable objects: .* the grace period \(24h\) has not passed", text), text
    report = json.loads(ok("--store", store, "gc", "--json"))
    assert report["kept_unreachable"]["manifests"] == 1 and report["kept_unreachable"]["blobs"] >= 2
    assert "kept" not in ok("--store", store, "gc", "--grace", "0s").split("\n")[-2]


def test_merge_refuses_an_output_whose_parent_folder_is_missing(store: Path, world: dict[str, Path], tmp_path: Path):
    out = tmp_path / "missing" / "parent" / "x"
    result = invoke("--store", store, "merge", "team/a:v1", "--base", world["base"], "--out", out)
    assert result.exit_code == 1 and "does not exist; create it first" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_memory_urls_are_refused_at_the_command_line(store: Path) -> None:
    for args in (["push", "team/a:v1", "memory://scratch"], ["pull", "memory://scratch/team/a"]):
        result = invoke("--store", store, *args)
        assert result.exit_code == 2 and "memory:// store lives only as long as one Python process" in result.stderr


def test_show_marks_fan_in_fan_out_modules(tmp_path: Path) -> None:
    gpt2 = tiny_gpt2()
    folder = save_lora(gpt2, tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    ok("--store", tmp_path / "s", "add", folder, "-t", "g/p")
    text = ok("--store", tmp_path / "s", "show", "g/p")
    assert "transformer.h.0.attn.c_attn  linear (fan_in_fan_out)  r=8" in text


def test_counts_of_one_are_singular(tmp_path: Path, world: dict[str, Path]) -> None:
    folder = write_adapter_folder(tmp_path / "one", modules=1, dim=32, r=2)
    store = tmp_path / "s"
    added = ok("--store", store, "add", folder, "-t", "o/one")
    assert "1 module, " in added and "1 modules" not in added
    assert "in 1 module\n" in ok("--store", store, "show", "o/one")
    composed = ok("--store", store, "compose", "o/one", "-w", "0.5", "-t", "o/half")
    assert "(linear of 1 adapter, 1 module, " in composed
    plan = ok("--store", store, "compose", "o/one", "-w", "0.5", "--dry-run")
    assert plan.startswith("plan: linear of 1 adapter, 1 module,")
    assert "1 module, " in ok("--store", store, "inspect", "o/one")
    single = save_base(tiny_llama(), tmp_path / "single")  # one model.safetensors
    ok("--store", tmp_path / "s2", "add", world["a"], "-t", "t/a")
    merged = ok("--store", tmp_path / "s2", "merge", "t/a", "--base", single, "--out", tmp_path / "m")
    assert "merged 1 adapter into" in merged and ", 1 shard, " in merged
    (store / "blobs" / "sha256" / "zz").mkdir()  # one stray entry: one problem
    result = invoke("--store", store, "verify")
    assert result.exit_code == 1 and result.stdout.endswith("\n1 problem found\n")


def test_compose_and_pull_show_progress_on_a_terminal(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from adapterkit import cli as cli_module

    monkeypatch.setattr(cli_module, "_is_terminal", lambda: True)
    result = invoke("--store", store, "compose", "team/a:v1", "team/b", "-s", "svd", "--rank", "2", "-t", "x/y")
    assert result.exit_code == 0 and "composing" in result.stderr
    ok("--store", store, "push", "team/a:v1", tmp_path / "remote")
    real = time.monotonic
    clock = iter(range(0, 10**6, 5))  # every reading five seconds later: the pull counts as long
    monkeypatch.setattr(time, "monotonic", lambda: real() + next(clock))
    pulled = invoke("--store", tmp_path / "other", "pull", f"{tmp_path / 'remote'}/team/a:v1")
    assert pulled.exit_code == 0 and "pulling" in pulled.stderr and " kB" in pulled.stderr


def test_log_shows_a_refs_history_newest_first(store: Path) -> None:
    a = json.loads(ok("--store", store, "show", "team/a:v1", "--json"))["digest"]
    b = json.loads(ok("--store", store, "show", "team/b", "--json"))["digest"]
    ok("--store", store, "tag", "team/a:v1", "team/b")
    ok("--store", store, "rm", "team/b")
    entries = json.loads(ok("--store", store, "log", "team/b", "--json"))
    assert [(e["digest"], e["previous"]) for e in entries] == [(None, a), (a, b), (b, None)]
    assert [e["operation"].split()[0] for e in entries] == ["rm", "tag", "add"]
    assert entries[0]["time"] >= entries[1]["time"] >= entries[2]["time"]
    lines = ok("--store", store, "log", "team/b").splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  \(removed\)\s+rm team/b", lines[0]), lines[0]
    assert f"  {b[:19]}  add " in lines[2]
    result = invoke("--store", store, "log", "team/never")
    assert result.exit_code == 1 and "no history for ref team/never:latest" in result.stderr


def test_list_filters_refs_by_a_glob(store: Path) -> None:
    ok("--store", store, "tag", "team/b", "other/b:v1")
    refs = lambda *p: [item["refs"] for item in json.loads(ok("--store", store, "list", *p, "--json"))]  # noqa: E731
    assert refs("team/*") == [["team/a:v1"], ["team/b:latest"]]
    assert refs("*:v1") == [["other/b:v1"], ["team/a:v1"]]
    assert refs("other/b") == [["other/b:v1"]]
    assert refs("nothing*") == []
    assert ok("--store", store, "list", "nothing*") == "no adapters match 'nothing*'\n"


def test_rm_takes_several_refs_all_or_nothing(store: Path) -> None:
    ok("--store", store, "tag", "team/b", "team/c")
    before = sorted(item["refs"][0] for item in json.loads(ok("--store", store, "list", "--json")))
    result = invoke("--store", store, "rm", "team/b", "team/c", "team/nope")
    assert result.exit_code == 1 and "no ref team/nope:latest" in result.stderr
    assert sorted(item["refs"][0] for item in json.loads(ok("--store", store, "list", "--json"))) == before
    text = ok("--store", store, "rm", "team/b", "team/c", "team/b:latest")
    assert [line.split(" (was ")[0] for line in text.splitlines()] == ["removed team/b:latest", "removed team/c:latest"]
    assert [item["refs"] for item in json.loads(ok("--store", store, "list", "--json"))] == [["team/a:v1"]]


def test_demo_prints_one_json_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json is accepted by every command, demo included: the commentary moves to stderr."""
    from adapterkit import Store, demo

    def fake_demo(workdir: Path | None, *, echo: Any) -> Path:  # the real one trains nothing but takes 10 s
        assert workdir is not None
        echo(f"working in {workdir}")
        Store(workdir / "store").add(write_adapter_folder(workdir / "src"), "demo/x:v1")
        return workdir

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    result = invoke("demo", "--workdir", tmp_path / "d", "--json")
    assert result.exit_code == 0 and result.stderr == f"working in {tmp_path / 'd'}\n"
    document = json.loads(result.stdout)
    assert document["workdir"] == str(tmp_path / "d") and document["store"] == str(tmp_path / "d" / "store")
    assert [item["refs"] for item in document["adapters"]] == [["demo/x:v1"]]
