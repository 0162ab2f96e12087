"""Docs and set-up instructions that cannot drift from the code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent


def _schema_fields(name: str) -> set[str]:
    schema = load_schema(name)
    fields = set(schema["properties"])
    for definition in schema.get("$defs", {}).values():
        fields |= set(definition.get("properties", {}))
    return fields


@pytest.mark.parametrize("schema", ["adapter.schema.json", "manifest.schema.json"])
def test_every_schema_field_is_documented(schema: str) -> None:
    text = (ROOT / "docs" / "metadata.md").read_text()
    missing = sorted(f for f in _schema_fields(schema) if f"`{f}`" not in text)
    assert not missing, f"fields of {schema} missing from docs/metadata.md: {missing}"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:sh|bash|console)\n(.*?)```", text, re.S)
    assert block, "README.md must open with a code block holding the set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_setup_commands_that_ci_runs() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert "constraints.txt" in install and "adapterkit demo" in install
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci, ".ci/run must run exactly README's commands"


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff not installed"
)
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(args: list[str]) -> None:
    ruff = Path(sys.executable).parent / "ruff"
    exe = str(ruff) if ruff.exists() else "ruff"
    result = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_constraints_pin_the_cpu_torch() -> None:
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    assert not any(line.lower().startswith("nvidia-") for line in pins)


def test_schemas_ship_inside_the_wheel(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("adapterkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "adapterkit/_schemas/adapter.schema.json" in names
    assert "adapterkit/_schemas/manifest.schema.json" in names


def test_cli_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_docs_index_is_the_readme() -> None:
    """docs/index.md is README.md with links made relative to docs/ (regenerate with the sed in the docstring).

    sed 's#(docs/#(#g' README.md > docs/index.md
    """
    readme = (ROOT / "README.md").read_text().replace("(docs/", "(")
    assert (ROOT / "docs" / "index.md").read_text() == readme


def test_mkdocs_site_builds_strictly(tmp_path: Path) -> None:
    """Every page in nav exists, every link resolves, no warnings (mkdocs build --strict)."""
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_error_class_is_in_the_troubleshooting_page() -> None:
    import adapterkit.errors

    text = (ROOT / "docs" / "errors.md").read_text()
    missing = [name for name in adapterkit.errors.__all__ if name not in text]
    assert not missing, f"docs/errors.md does not mention {missing}"
