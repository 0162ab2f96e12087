"""The CLI contract: --json anywhere, one-line errors with exit 1, usage errors exit 2, no torch for registry work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import save_base, save_lora, tiny_llama

from adapterkit.cli import cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama()
    return {
        "base": save_base(base, root / "base", max_shard_size="40KB"),
        "a": save_lora(base, root / "a", seed=1),
        "b": save_lora(base, root / "b", seed=2, r=4, target_modules=["q_proj", "down_proj"]),
    }


def run(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, (result.output, result.stderr)
    return result.stdout


@pytest.fixture
def store(tmp_path: Path, folders: dict[str, Path]) -> Path:
    path = tmp_path / "store"
    run("--store", path, "add", folders["a"], "--tag", "team/a:v1", "--base", folders["base"])
    run("--store", path, "add", folders["b"], "--tag", "team/b")
    return path


@pytest.mark.parametrize("command", [["list"], ["show", "team/a:v1"], ["verify", "--full"], ["gc", "--dry-run"]])
def test_json_flag_before_or_after_command(store: Path, command: list[str]) -> None:
    before = json.loads(run("--store", store, "--json", *command))
    after = json.loads(run("--store", store, *command, "--json"))
    assert before == after


def test_adapter_objects_carry_digest_and_refs(store: Path, folders: dict[str, Path]) -> None:
    listing = json.loads(run("--store", store, "list", "--json"))
    assert [item["refs"] for item in listing] == [["team/a:v1"], ["team/b:latest"]]
    assert all(item["digest"].startswith("sha256:") for item in listing)
    shown = json.loads(run("--store", store, "show", "team/b", "--json"))
    assert shown["refs"] == ["team/b:latest"] and shown["digest"] == listing[1]["digest"]
    assert shown["num_modules"] == len(shown["modules"]) == 4
    added = json.loads(run("--store", store, "add", folders["b"], "--tag", "team/b:again", "--json"))
    assert added["digest"] == shown["digest"] and added["new_bytes"] == 0
    assert sorted(added["refs"]) == ["team/b:again", "team/b:latest"]


def test_show_text_names_modules_and_base(store: Path) -> None:
    text = run("--store", store, "show", "team/a:v1")
    assert "model.layers.1.self_attn.v_proj  linear  r=8 alpha=16 scaling=2" in text
    assert "base model:  " in text and "sha256:" in text


def test_errors_are_one_line_exit_1(store: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--store", str(store), "show", "team/nope"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: no adapter team/nope:latest")
    result = CliRunner().invoke(cli, ["--store", str(store), "add", str(tmp_path), "--tag", "x"])
    assert result.exit_code == 1 and "no adapter_config.json" in result.stderr
    result = CliRunner().invoke(cli, ["--store", str(store), "tag", "team/b", "Bad/Name"])
    assert result.exit_code == 1 and "invalid adapter name 'Bad/Name'" in result.stderr


def test_usage_errors_exit_2(store: Path) -> None:
    assert CliRunner().invoke(cli, ["--store", str(store), "gc", "--grace", "soon"]).exit_code == 2
    assert CliRunner().invoke(cli, ["--store", str(store), "add"]).exit_code == 2
    assert CliRunner().invoke(cli, ["no-such-command"]).exit_code == 2


def test_export_is_byte_identical_to_blobs(store: Path, tmp_path: Path) -> None:
    shown = json.loads(run("--store", store, "show", "team/a:v1", "--json"))
    out = tmp_path / "exported"
    run("--store", store, "export", "team/a:v1", out)
    for entry in shown["files"]:
        digest = entry["digest"].removeprefix("sha256:")
        blob = store / "blobs" / "sha256" / digest[:2] / digest[2:]
        assert (out / entry["name"]).read_bytes() == blob.read_bytes()


def test_fingerprint_command_matches_api(folders: dict[str, Path]) -> None:
    from adapterkit import fingerprint

    document = json.loads(run("fingerprint", folders["base"], "--content", "--json"))
    expected = fingerprint(folders["base"], content=True)
    assert document["structure_digest"] == expected.structure_digest
    assert document["content_digest"] == expected.content_digest


def test_store_from_environment(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_HOME", str(store))
    assert "team/a:v1" in run("list")


def test_registry_commands_do_not_import_torch(store: Path) -> None:
    probe = (
        "import sys\n"
        "from adapterkit.cli import cli\n"
        "for args in (['list'], ['list', 'team/*'], ['show', 'team/a:v1'], ['verify'],\n"
        "             ['tag', 'team/a:v1', 'team/c'], ['log', 'team/c'], ['rm', 'team/c'], ['gc']):\n"
        "    cli.main(['--store', sys.argv[1], *args], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(store)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "adapterkit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "adapterkit, version" in result.stdout


def test_list_skips_revalidating_documents_it_has_validated(store: Path) -> None:
    """Schema validation is memoized by digest (the bytes are hash-checked on every read)."""
    probe = (
        "import sys\n"
        "from adapterkit.cli import cli\n"
        "cli.main(['--store', sys.argv[1], 'list'], standalone_mode=False)\n"
        "print('jsonschema' in sys.modules)\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", probe, str(store)], capture_output=True, text=True).stdout.split()[-1]
        for _ in range(2)
    ]
    assert runs[1] == "False"  # the warm run never needed jsonschema
    (memo,) = (store / "state").glob("validated-*")
    assert len(memo.read_text().split()) == 4  # two manifests and two metadata blobs


def test_push_and_pull_through_the_cli(store: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    pushed = json.loads(run("--store", store, "push", "team/a:v1", remote, "--json"))
    assert pushed["remote"] == f"{remote}/team/a:v1" and pushed["transferred_bytes"] > 0
    again = json.loads(run("--store", store, "push", "team/a:v1", f"file://{remote}", "--json"))
    assert again["transferred_bytes"] == 0
    other = tmp_path / "other"
    pulled = json.loads(run("--store", other, "pull", f"{remote}/team/a:v1", "--tag", "mine/a:copy", "--json"))
    assert pulled["digest"] == pushed["digest"] and pulled["refs"] == ["mine/a:copy"]
    assert "mine/a:copy" in run("--store", other, "list")


def test_inspect_prints_interference_and_writes_a_plot(store: Path, tmp_path: Path) -> None:
    report = json.loads(run("--store", store, "inspect", "team/a:v1", "team/b", "-w", "0.5,0.5", "--json"))
    assert len(report["adapters"]) == 2 and len(report["interference"]["pairs"]) == 1
    png = tmp_path / "inspect.png"
    text = run("--store", store, "inspect", "team/a:v1", "team/b", "--plot", png)
    assert "cosine" in text and f"plot written to {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_dry_runs_plan_without_writing(store: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    before = sorted(p.relative_to(store) for p in store.rglob("*") if "state" not in p.parts)
    plan = json.loads(
        run("--store", store, "compose", "team/a:v1", "team/b", "-s", "svd", "--rank", "3", "--dry-run", "--json")
    )
    assert plan["ranks"] == {"min": 3, "max": 3} and plan["flops"] > 0
    out = tmp_path / "merged"
    summary = json.loads(
        run("--store", store, "merge", "team/a:v1", "--base", folders["base"], "--out", out, "--dry-run", "--json")
    )
    assert len(summary["merged_tensors"]) == 4 and not out.exists()
    assert sorted(p.relative_to(store) for p in store.rglob("*") if "state" not in p.parts) == before
    result = CliRunner().invoke(cli, ["--store", str(store), "compose", "team/a:v1"])
    assert result.exit_code == 2 and "--tag" in result.output


def test_demo_refuses_a_folder_that_holds_files(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 1
    assert "not empty; the demo builds its files in a new or empty folder" in result.stderr
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["keep.txt"]


def test_a_warning_inside_a_command_is_one_clean_line(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote's warning during `pull` (the Hub's stale-manifest notice, say) reads like the CLI's errors."""
    import warnings

    import adapterkit

    real_pull = adapterkit.pull

    def pull_with_notice(*args: object, **kwargs: object) -> object:
        warnings.warn("adapterkit: hf://org/x@abc: README.md no longer matches the manifest; importing", stacklevel=2)
        return real_pull(*args, **kwargs)

    monkeypatch.setattr(adapterkit, "pull", pull_with_notice)  # the CLI calls the public API
    run("--store", store, "push", "team/a:v1", tmp_path / "remote")
    notice = "Warning: hf://org/x@abc: README.md no longer matches the manifest; importing\n"
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "b"), "pull", f"{tmp_path / 'remote'}/team/a:v1"])
    assert result.exit_code == 0, result.output
    assert result.stderr == notice  # no file name, no "UserWarning", no source line
    assert result.stdout.startswith("pulled team/a:v1 sha256:")
    failed = CliRunner().invoke(cli, ["--store", str(tmp_path / "b"), "pull", f"{tmp_path / 'remote'}/team/nope"])
    assert failed.exit_code == 1  # the same warning again (every time, not once per place), then the error
    assert failed.stderr.splitlines() == [
        notice.strip(),
        f"Error: no adapter team/nope:latest on {tmp_path / 'remote'}",
    ]


def test_running_out_of_memory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (an adapter or model larger than the machine) is reported like any error: one line, exit 1."""
    import adapterkit

    def exhausted(*_args: object, **_kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(adapterkit.Store, "list", exhausted)
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "list"])
    assert result.exit_code == 1
    assert result.stderr == "Error: out of memory: the adapters or the model do not fit in this machine's RAM\n"
    as_json = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "--json", "list"])
    assert json.loads(as_json.stdout)["error"]["type"] == "MemoryError"


@pytest.fixture(scope="module")
def extras_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding adapters that carry each kind of tensor beyond the LoRA factors."""
    import torch
    from helpers import make_lora

    root = tmp_path_factory.mktemp("extras")
    base, biased = tiny_llama(), tiny_llama(attention_bias=True)
    specs: dict[str, tuple[Any, dict[str, Any]]] = {
        "dora": (base, dict(use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])),
        "head": (base, dict(modules_to_save=["lm_head"])),
        "lora-bias": (base, dict(lora_bias=True, target_modules=["q_proj"])),
        "tokens": (base, dict(trainable_token_indices={"embed_tokens": [1, 2, 3]})),
        "biases": (biased, dict(bias="all")),
    }
    store = root / "store"
    for name, (model, spec) in specs.items():
        peft_model = make_lora(model, **spec)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if key.endswith(".bias") and "lora_" not in key:
                    param.add_(1.0)  # trained biases: saved only where they moved
        peft_model.save_pretrained(root / name)
        run("--store", store, "add", root / name, "--tag", f"x/{name}")
    return store


def test_show_lists_what_an_adapter_carries_beyond_its_factors(extras_store: Path) -> None:
    def section(ref: str) -> list[str]:
        text = run("--store", extras_store, "show", ref).splitlines()
        return text[text.index("extras:") + 1 :]

    assert section("x/dora") == [
        "  DoRA magnitude vectors    5  one per LoRA module",
        "  base layer copies         1  model.embed_tokens (saved by PEFT beside the factors)",
    ]
    assert section("x/head") == ["  modules_to_save copies    1  lm_head"]
    assert section("x/lora-bias") == [
        "  lora_B biases    2  one per LoRA module",
    ]
    assert section("x/tokens") == ["  trainable tokens    1  model.embed_tokens (3 tokens)"]
    assert section("x/biases") == [
        "  trained biases    8  model.layers.0.self_attn.k_proj, model.layers.0.self_attn.o_proj, "
        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj and 4 more (bias='all')"
    ]
    shown = json.loads(run("--store", extras_store, "show", "x/tokens", "--json"))
    assert shown["extras"] == {
        "trainable_tokens": {"modules": ["model.embed_tokens"], "tokens": {"model.embed_tokens": 3}}
    }
    dora = json.loads(run("--store", extras_store, "show", "x/dora", "--json"))["extras"]["dora_magnitude"]
    assert dora["modules"][0] == "model.embed_tokens" and len(dora["modules"]) == 5
    probe = (  # describing the extras reads key names only: show stays torch-free
        "import sys\n"
        "from adapterkit.cli import cli\n"
        "cli.main(['--store', sys.argv[1], 'show', 'x/dora'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(extras_store)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_show_of_a_plain_adapter_has_no_extras(store: Path) -> None:
    assert "extras:" not in run("--store", store, "show", "team/a:v1")
    assert json.loads(run("--store", store, "show", "team/a:v1", "--json"))["extras"] == {}


def test_inspect_text_of_a_dora_adapter(extras_store: Path) -> None:
    lines = run("--store", extras_store, "inspect", "x/dora", "x/head").splitlines()
    assert lines[0].startswith("x/dora: 5 modules, ")
    assert "|directional update| " in lines[0] and ", DoRA: 5 magnitude vectors, |m| " in lines[0]
    assert lines[1].startswith("x/head: 4 modules, ") and "|delta| " in lines[1] and "DoRA" not in lines[1]
    assert lines[2].startswith("interference and energy not computed: adapter 1 (sha256:")
    assert "is DoRA (field 'use_dora')" in lines[2] and len(lines) == 3
    result = CliRunner().invoke(cli, ["--store", str(extras_store), "inspect", "x/dora", "--plot", "x.png"])
    assert result.exit_code == 1 and "nothing to plot: adapter 1 (sha256:" in result.stderr
