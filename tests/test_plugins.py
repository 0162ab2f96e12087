"""Plugins: built-ins and third-party plugins through the same hooks, real entry points, failures contained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapterkit import hookspecs
from adapterkit.errors import PluginError
from adapterkit.hookspecs import hookimpl
from adapterkit.plugins import Plugins

HERE = Path(__file__).resolve().parent


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which two plugins are installed through real ``adapterkit`` entry points.

    The dist-info directory is what pip writes for an installed package; importlib.metadata finds it on
    sys.path exactly as it finds any installed distribution.
    """
    dist = tmp_path / "site" / "adapterkit_normalized-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: adapterkit-normalized\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[adapterkit]\nnormalized = adapterkit_normalized\nbroken = adapterkit_broken\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(HERE / "plugins"), env.get("PYTHONPATH", "")])
    env.pop("ADAPTERKIT_STRICT_PLUGINS", None)
    return env


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterkit", *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def test_hook_register_strategies(plugin_env: dict[str, str], peft_folders: Any, tmp_path: Path) -> None:
    """A third-party strategy installed through an entry point is listed and used from the CLI."""
    listing = cli(plugin_env, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    document = json.loads(listing.stdout)
    owners = {s["name"]: s["plugin"] for s in document["strategies"]}
    assert owners["normalized_linear"] == "normalized"
    assert owners["svd"] == "adapterkit.default_plugins"  # built-ins go through the same hook
    assert {
        "name": "normalized",
        "version": "0.1",
        "builtin": False,
        "hooks": ["register_commands", "register_formats", "register_strategies"],
    } in document["plugins"]

    store = tmp_path / "store"
    assert cli(plugin_env, "--store", store, "add", peft_folders.lora, "--tag", "a").returncode == 0
    assert cli(plugin_env, "--store", store, "add", peft_folders.lora2, "--tag", "b").returncode == 0
    made = cli(
        plugin_env,
        "--store",
        store,
        "compose",
        "a",
        "b",
        "-w",
        "3,1",
        "-s",
        "normalized_linear",
        "-t",
        "blend",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["lineage"]["strategy"] == "normalized_linear"

    import torch

    from adapterkit import Store

    blend, a, b = (Store(store).get(ref) for ref in ("blend", "a", "b"))
    name = "model.layers.0.self_attn.q_proj"
    expected = 0.75 * a.delta(name) + 0.25 * b.delta(name)
    assert torch.allclose(blend.delta(name), expected, atol=1e-6)


def test_hook_register_formats(plugin_env: dict[str, str], peft_folders: Any, tmp_path: Path) -> None:
    """A third-party format from an entry point: listed, written by ``export --format``, read back by ``add``."""
    listing = json.loads(cli(plugin_env, "plugins", "--json").stdout)
    owners = {f["name"]: (f["plugin"], f["read"], f["write"]) for f in listing["formats"]}
    assert owners["flat"] == ("normalized", True, True)
    assert owners["peft"] == ("adapterkit.default_plugins", True, True)  # the built-in goes through the same hook

    store = tmp_path / "store"
    assert cli(plugin_env, "--store", store, "add", peft_folders.lora, "--tag", "a").returncode == 0
    flat = tmp_path / "a.lora.safetensors"
    written = cli(plugin_env, "--store", store, "export", "a", flat, "--format", "flat", "--json")
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["written"] == [str(flat)]
    added = cli(plugin_env, "--store", store, "add", flat, "--tag", "b", "--json")  # recognised by its name
    assert added.returncode == 0, added.stderr

    from adapterkit import Store

    local = Store(store)
    original, back = local.show("a"), local.show("b")
    by_name = {f["name"]: f["digest"] for f in original["files"]}
    assert {f["name"]: f["digest"] for f in back["files"]}["adapter_model.safetensors"] == by_name[
        "adapter_model.safetensors"
    ]  # the same tensors, byte for byte once canonical
    assert back["modules"] == original["modules"] and back["peft_config"] == original["peft_config"]
    refused = cli(plugin_env, "--store", store, "export", "a", tmp_path / "x", "--format", "nope")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == "Error: unknown format 'nope'; available: flat, gguf, peft"


def test_a_broken_plugin_warns_and_the_rest_work(plugin_env: dict[str, str]) -> None:
    result = cli(plugin_env, "plugins")
    assert result.returncode == 0
    assert result.stderr == (
        "Warning: plugin 'broken' (adapterkit_broken) failed to load: ImportError: this plugin is broken on purpose; "
        "continuing without it\n"
    )
    assert "normalized_linear" in result.stdout and "broken: FAILED" in result.stdout


def test_strict_mode_turns_a_broken_plugin_into_an_error(plugin_env: dict[str, str]) -> None:
    result = cli({**plugin_env, "ADAPTERKIT_STRICT_PLUGINS": "1"}, "plugins")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: plugin 'broken'")


def test_plugins_can_be_disabled_by_name(plugin_env: dict[str, str]) -> None:
    result = cli({**plugin_env, "ADAPTERKIT_DISABLE_PLUGINS": "broken,normalized"}, "plugins", "--json")
    assert result.returncode == 0 and result.stderr == ""
    assert "normalized_linear" not in {s["name"] for s in json.loads(result.stdout)["strategies"]}


def test_hook_register_commands(plugin_env: dict[str, str]) -> None:
    result = cli(plugin_env, "normalized-hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from adapterkit-normalized on adapterkit ")


class MemoryRemotes:
    __name__ = "memory-remotes"

    @staticmethod
    @hookimpl
    def register_remotes(register: Any) -> None:
        register("mem", lambda url: {"url": url})


def test_hook_register_remotes() -> None:
    plugins = Plugins(entry_points=False)
    plugins.register(MemoryRemotes, name="memory-remotes")
    factory = plugins.remotes()["mem"]
    assert factory("mem://x") == {"url": "mem://x"}
    owners = plugins.remote_owners()
    assert owners["mem"] == "memory-remotes"
    assert owners["s3"] == "adapterkit.default_plugins"  # built-in remotes go through the same hook


def test_a_remote_factory_that_returns_no_remote_is_a_plugin_error() -> None:
    """The plugin is at fault, not the push or pull: PluginError (not SyncError), naming the scheme."""
    from adapterkit.errors import SyncError
    from adapterkit.sync import open_remote

    plugins = Plugins(entry_points=False)
    plugins.register(MemoryRemotes, name="memory-remotes")
    with pytest.raises(PluginError, match=r"^the mem:// plugin returned dict, which is not a Remote$") as info:
        open_remote("mem://x", plugins=plugins)
    assert not isinstance(info.value, SyncError)


def test_duplicate_names_are_refused_naming_both_plugins() -> None:
    from adapterkit.strategies.linear import STRATEGY

    class Clash:
        @staticmethod
        @hookimpl
        def register_strategies(register: Any) -> None:
            register(STRATEGY)

    plugins = Plugins(entry_points=False)
    plugins.register(Clash, name="clash")
    with pytest.raises(
        PluginError, match=r"'linear' is registered by both plugin 'adapterkit\.default_plugins' and plugin 'clash'"
    ):
        plugins.strategies()


def test_impls_may_take_a_subset_of_arguments() -> None:
    class NoArgs:
        @staticmethod
        @hookimpl
        def register_strategies() -> None:
            NoArgs.called = True

    plugins = Plugins(entry_points=False)
    plugins.register(NoArgs, name="no-args")
    assert "svd" in plugins.strategies() and NoArgs.called


def test_impls_that_match_no_hook_are_refused() -> None:
    class Typo:
        @staticmethod
        @hookimpl
        def register_strategy(register: Any) -> None: ...

    plugins = Plugins(entry_points=False)
    plugins.register(Typo, name="typo")
    with pytest.raises(Exception, match="unknown hook 'register_strategy'"):
        plugins.pm.check_pending()


def _hooks() -> list[str]:
    return sorted(name for name in dir(hookspecs) if name.startswith("register_"))


@pytest.mark.parametrize("hook", _hooks())
def test_every_hook_has_a_test(hook: str) -> None:
    assert f"test_hook_{hook}" in globals(), f"write test_hook_{hook} in tests/test_plugins.py"


@pytest.mark.parametrize("hook", _hooks())
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    import inspect

    signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
    text = (HERE.parent / "docs" / "plugins.md").read_text()
    assert f"## `{signature}`" in text, f"docs/plugins.md needs a '## `{signature}`' section"
