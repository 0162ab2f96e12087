"""Regenerate docs/cli.md from the CLI's own --help output.

python docs/gen_cli_reference.py          # rewrite docs/cli.md
python docs/gen_cli_reference.py --check  # exit 1 when docs/cli.md is stale (the test suite does this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

from adapterkit.cli import cli

TARGET = Path(__file__).resolve().parent / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = [
        "# CLI reference\n",
        "Generated from `adapterkit --help` by `python docs/gen_cli_reference.py`; "
        "a test fails when it is out of date.\n",
        "Every command accepts `--json` (before or after the command name) and prints one JSON document; "
        'under `--json` an error is printed on stdout as `{"error": {"type": ..., "message": ...}}`. '
        "Exit codes: 0 success, 1 a reported error (one line on stderr), 2 a usage error.\n",
    ]
    commands = [("adapterkit", [])] + [
        (f"adapterkit {name}", [name]) for name in sorted(cli.commands) if not cli.commands[name].hidden
    ]
    for title, args in commands:
        result = runner.invoke(cli, [*args, "--help"], prog_name="adapterkit", terminal_width=100)
        parts.append(f"## `{title}`\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


def main() -> None:
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            click.echo("docs/cli.md is stale: run python docs/gen_cli_reference.py", err=True)
            sys.exit(1)
        return
    TARGET.write_text(text)


if __name__ == "__main__":
    main()
