"""The ``adapterkit`` command: parse, call the public API, print text or ``--json``.

Every :class:`~adapterkit.errors.AdapterkitError` becomes one line on stderr and exit code 1,
in one place (:class:`_Group`); usage errors exit 2 as click does. Registry commands import
neither torch nor transformers, so ``adapterkit list`` starts fast.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import click

import adapterkit
from adapterkit import AdapterkitError, Store, __version__

__all__ = ["cli", "main"]


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show adapterkit's warnings raised in the block as one clean line each: ``Warning: MESSAGE`` on stderr.

    adapterkit prefixes its warnings with ``adapterkit: ``; those are shown every time, in place of
    Python's ``FILE:LINE: UserWarning: adapterkit: ...``. Other warnings are shown as Python shows them.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.filterwarnings("always", message="adapterkit: ")
            caught = recorded
            yield
    finally:  # outside catch_warnings, so the others reach whatever shows warnings here
        for warning in caught:
            text = str(warning.message)
            if text.startswith("adapterkit: "):
                click.echo(f"Warning: {' '.join(text.removeprefix('adapterkit: ').split())}", err=True)
            else:
                warnings.showwarning(
                    warning.message, warning.category, warning.filename, warning.lineno, warning.file, warning.line
                )


class _Failure(click.ClickException):
    """A reported error: ``Error: MESSAGE`` on stderr, or under ``--json`` one document on stdout.

    Scripts that asked for JSON get JSON for failures too, ``{"error": {"type", "message"}}``,
    with the exit code unchanged (1 for a reported error, 2 for a usage error).
    """

    def __init__(self, message: str, kind: str, *, as_json: bool, exit_code: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.as_json = as_json
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        if self.as_json:
            document = {"error": {"type": self.kind, "message": self.format_message()}}
            click.echo(json.dumps(document, indent=2, sort_keys=True))
        else:
            super().show(file)


def _json_requested(ctx: click.Context) -> bool:
    """``--json`` was given: parsed already, or at least present among the arguments (a usage error may come first)."""
    root = ctx.find_root()
    return bool((root.obj or {}).get("json")) or "--json" in root.meta.get("adapterkit.args", ())


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["adapterkit.args"] = list(args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if "--json" not in args:
                raise
            raise _Failure(exc.format_message(), type(exc).__name__, as_json=True, exit_code=exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _warnings_as_lines():
                return super().invoke(ctx)
        except AdapterkitError as exc:
            message = " ".join(str(exc).split("\n"))
            raise _Failure(message, type(exc).__name__, as_json=_json_requested(ctx)) from None
        except MemoryError:  # adapters or a model larger than this machine holds: one line, like any other error
            message = "out of memory: the adapters or the model do not fit in this machine's RAM"
            raise _Failure(message, "MemoryError", as_json=_json_requested(ctx)) from None
        except click.UsageError as exc:
            if not _json_requested(ctx):
                raise
            raise _Failure(exc.format_message(), type(exc).__name__, as_json=True, exit_code=exc.exit_code) from None


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["json"] = True


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` is accepted before or after the command name."""
    return click.option(
        "--json",
        "json_",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        is_eager=True,
        help="Print one JSON document instead of text.",
    )(func)


def _store(ctx: click.Context) -> Store:
    return Store(ctx.ensure_object(dict).get("store"))


def _wants_json(ctx: click.Context) -> bool:
    return bool(ctx.ensure_object(dict).get("json"))


def _emit(ctx: click.Context, document: Any, text: Callable[[], str]) -> None:
    if _wants_json(ctx):
        click.echo(json.dumps(document, indent=2, sort_keys=True))
    else:
        click.echo(text())


def _is_terminal() -> bool:
    """Whether stderr is a terminal: progress is shown only there (never in pipes, logs or tests)."""
    return sys.stderr.isatty()


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if total <= 0 or not _is_terminal():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@contextmanager
def _lazy_progress(label: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress bar for work whose total is known only at the first callback."""
    if not _is_terminal():
        yield None
        return
    state: dict[str, Any] = {}

    def update(done: int, total: int, _item: str) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            state["bar"].__enter__()
        state["bar"].update(done - state.get("done", 0))
        state["done"] = done

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ADAPTERKIT_HOME",
    show_envvar=True,
    help="Store directory [default: ~/.adapterkit].",
)
@json_option
@click.version_option(__version__, prog_name="adapterkit")
@click.pass_context
def cli(ctx: click.Context, store: Path | None) -> None:
    """adapterkit: a registry and toolkit for LoRA adapters."""
    ctx.ensure_object(dict)["store"] = store


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    """``noun`` for one, ``plural`` (default ``noun + "s"``) for any other count."""
    return noun if count == 1 else plural or f"{noun}s"


def _plural_count(count: int, noun: str) -> str:
    return f"{count} {_plural(count, noun)}"


def _was(previous: str | None) -> str:
    """`` (was sha256:...)`` after a ref that a command moved from another adapter, as ``rm`` prints it."""
    return f" (was {previous})" if previous else ""


def _ranks_text(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _span(ranks: dict[str, int]) -> str:
    return _ranks_text(sorted({ranks["min"], ranks["max"]}))


def _base_text(base: dict[str, Any] | None) -> str:
    if not base:
        return "-"
    name = base.get("name") or "?"
    if base.get("structure_digest"):
        return f"{name} ({_short(base['structure_digest'])})"
    return name


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tag", "-t", required=True, metavar="NAME[:TAG]", help="Ref to point at the adapter.")
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE_DIR",
    help="Base model folder: record its fingerprint and check every module against it.",
)
@click.option(
    "--content",
    is_flag=True,
    help="With --base, also record the base's content digest (reads every byte of the base), which tells "
    "apart bases of one architecture with different weights.",
)
@json_option
@click.pass_context
def add(ctx: click.Context, path: Path, tag: str, base: Path | None, content: bool) -> None:
    """Import the PEFT adapter folder PATH into the store."""
    if content and base is None:
        raise click.UsageError("--content needs --base BASE_DIR (the base whose content is hashed).")
    store = _store(ctx)
    weights = path / "adapter_model.safetensors"
    total = weights.stat().st_size if weights.is_file() else 0
    with _progress("hashing", total) as progress:
        result = store.add(path, tag, base=base, base_content=content, progress=progress)
    document = {**result.info, "ref": result.ref, "new_bytes": result.new_bytes, "previous": result.previous}
    _emit(
        ctx,
        document,
        lambda: (
            f"{result.ref} {result.digest} ({human_size(result.new_bytes)} new, "
            f"{_modules_text(result.info)}){_was(result.previous)}"
        ),
    )


def _modules_text(info: dict[str, Any]) -> str:
    modules, parameters = info["num_modules"], info["num_parameters"]
    return f"{modules} {_plural(modules, 'module')}, {parameters:,} {_plural(parameters, 'parameter')}"


@cli.command(name="list")
@click.argument("pattern", required=False)
@json_option
@click.pass_context
def list_(ctx: click.Context, pattern: str | None) -> None:
    """List the adapters that refs point at; PATTERN (a glob) keeps the refs it matches.

    A PATTERN with a ':' is matched against NAME:TAG ('*:v1'), one without against the name
    ('demo/*'); '*' also matches '/'.
    """
    items = _store(ctx).list(pattern)

    def text() -> str:
        if not items:
            return "no adapters" + (f" match {pattern!r}" if pattern is not None else "")
        rows = [("REF", "DIGEST", "BASE", "R", "MODULES", "PARAMS", "SIZE")]
        for item in items:
            if "error" in item:
                rows.append(
                    (", ".join(item["refs"]), _short(item["digest"]), f"error: {item['error']}", "", "", "", "")
                )
                continue
            rows.append(
                (
                    ", ".join(item["refs"]),
                    _short(item["digest"]),
                    _base_text(item["base_model"]),
                    _ranks_text(item["ranks"]),
                    str(item["num_modules"]),
                    f"{item['num_parameters']:,}",
                    human_size(item["size"]),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)

    _emit(ctx, items, text)


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str) -> None:
    """Show an adapter: config, modules, files, base model, lineage, refs."""
    info = _store(ctx).show(ref)

    def text() -> str:
        target = info["target_modules"]
        lines = [
            f"digest:      {info['digest']}",
            f"refs:        {', '.join(info['refs']) or '-'}",
            f"type:        {info['peft_type']} ({info['task_type'] or 'no task type'})",
            f"base model:  {_base_text(info['base_model'])}",
            f"r / alpha:   {info['r']} / {info['lora_alpha']}{' (rslora)' if info['use_rslora'] else ''}"
            + (f", module ranks {_ranks_text(info['ranks'])}" if len(info["ranks"]) > 1 else ""),
            f"targets:     {', '.join(target) if isinstance(target, list) else target}",
            f"parameters:  {info['num_parameters']:,} in {_plural_count(info['num_modules'], 'module')}",
            f"size:        {human_size(info['size'])}",
        ]
        if info["carried"]:
            lines.append(f"carried:     {', '.join(info['carried'])} (beyond plain LoRA; stored and exported as is)")
        lineage = info["lineage"]
        if lineage and lineage.get("source"):
            source = lineage["source"]
            lines.append(
                f"lineage:     {lineage['strategy']} from {source['name']} ({_short(source['structure_digest'])})"
            )
        elif lineage:
            parents = ", ".join(f"{_short(p['digest'])} x {p['weight']}" for p in lineage["parents"])
            lines.append(f"lineage:     {lineage['strategy']} of {parents}")
        lines.append("files:")
        for f in info["files"]:
            lines.append(f"  {f['name']:<28} {human_size(f['size']):>10}  {_short(f['digest'])}")
        lines.append("modules:")
        for m in info["modules"]:
            shape = f"{m['in']}->{m['out']}"
            # GPT-2's Conv1D stores its weight transposed: PEFT must be told (fan_in_fan_out), and so must a reader.
            kind = f"{m['kind']} (fan_in_fan_out)" if m.get("fan_in_fan_out") else m["kind"]
            lines.append(f"  {m['name']}  {kind}  r={m['r']} alpha={m['alpha']} scaling={m['scaling']:g}  {shape}")
        if info.get("extras"):
            lines.append("extras:")
            lines.extend(_extras_lines(info))
        return "\n".join(lines)

    _emit(ctx, info, text)


#: How ``show`` names each kind of tensor an adapter carries beyond its LoRA factors.
_EXTRA_LABELS = {
    "dora_magnitude": "DoRA magnitude vectors",
    "lora_bias": "lora_B biases",
    "modules_to_save": "modules_to_save copies",
    "trained_bias": "trained biases",
    "trainable_tokens": "trainable tokens",
    "base_copy": "base layer copies",
    "other": "other tensors",
}
#: Modules named in a line of ``show``'s extras before the rest are counted.
_EXTRA_NAMES_SHOWN = 4


def _extras_lines(info: dict[str, Any]) -> list[str]:
    """One line per kind of extra tensor: how many modules carry it, and which."""
    lora_modules = sorted(m["name"] for m in info["modules"])
    width = max(len(_EXTRA_LABELS.get(kind, kind)) for kind in info["extras"])
    lines = []
    for kind, entry in info["extras"].items():
        names = entry["modules"]
        if kind in ("dora_magnitude", "lora_bias") and names == lora_modules:
            where = "one per LoRA module"
        else:
            tokens = entry.get("tokens", {})
            shown = [f"{n} ({_plural_count(tokens[n], 'token')})" if n in tokens else n for n in names]
            where = ", ".join(shown[:_EXTRA_NAMES_SHOWN])
            if len(shown) > _EXTRA_NAMES_SHOWN:
                where += f" and {len(shown) - _EXTRA_NAMES_SHOWN} more"
        if kind == "trained_bias":
            where += f" (bias={info['peft_config'].get('bias')!r})"
        elif kind == "base_copy":
            where += " (saved by PEFT beside the factors)"
        lines.append(f"  {_EXTRA_LABELS.get(kind, kind):<{width}}  {len(names):>3}  {where}")
    return lines


@cli.command()
@click.argument("ref")
@click.argument("new_ref", metavar="NAME[:TAG]")
@json_option
@click.pass_context
def tag(ctx: click.Context, ref: str, new_ref: str) -> None:
    """Point NAME[:TAG] at the adapter REF names."""
    result = _store(ctx).update_tag(ref, new_ref)
    _emit(
        ctx,
        {"ref": new_ref, "digest": result.digest, "previous": result.previous},
        lambda: f"{new_ref} -> {result.digest}{_was(result.previous)}",
    )


@cli.command()
@click.argument("refs", nargs=-1, required=True, metavar="NAME[:TAG]...")
@json_option
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove refs: all of them, or none when one is missing. The adapters' data stays until `gc` finds nothing
    pointing at it.

    With --json: one object for one ref (as before rm took several), a list of them for several."""
    removed = _store(ctx).remove_refs(refs)
    document: Any = [{"removed": ref, "digest": digest} for ref, digest in removed]
    if len(refs) == 1:
        document = document[0]  # one ref, one object (as before several were accepted)
    _emit(ctx, document, lambda: "\n".join(f"removed {ref} (was {digest})" for ref, digest in removed))


@contextmanager
def _byte_counter(label: str) -> Iterator[Callable[[int], None] | None]:
    """Bytes moved so far, on one self-rewriting stderr line, for transfers whose total is not known up front.

    Shown only on a terminal, and only once the work has run for a second: a quick transfer prints nothing.
    """
    if not _is_terminal():
        yield None
        return
    import time

    state = {"bytes": 0, "start": time.monotonic(), "shown": 0.0}

    def update(count: int) -> None:
        state["bytes"] += count
        now = time.monotonic()
        if now - state["start"] >= 1.0 and now - state["shown"] >= 0.1:
            state["shown"] = now
            click.echo(f"\r{label} {human_size(int(state['bytes']))}\x1b[K", err=True, nl=False)

    try:
        yield update
    finally:
        if state["shown"]:
            click.echo(f"\r{label} {human_size(int(state['bytes']))}\x1b[K", err=True)


@cli.command()
@click.argument("ref", metavar="NAME[:TAG]")
@json_option
@click.pass_context
def log(ctx: click.Context, ref: str) -> None:
    """Show the history of a ref, newest first: when it moved, to which adapter, and by which command."""
    import time

    entries = _store(ctx).history(ref)

    def text() -> str:
        lines = []
        for entry in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
            target = _short(entry["digest"]) if entry["digest"] else "(removed)"
            lines.append(f"{when}  {target:<19}  {entry['operation']}")
        return "\n".join(lines)

    _emit(ctx, entries, text)


def _certificate_text(certificate: dict[str, Any]) -> str:
    """One line: how many modules were re-read and the largest relative difference of their deltas."""
    worst = certificate["max_rel_diff"]
    where = f" ({certificate['worst_module']})" if worst and certificate.get("worst_module") else ""
    value = "0 (exact)" if worst == 0 else f"{worst:.2e}{where}"
    return f"certificate: {len(certificate['modules'])} modules re-read, largest relative difference {value}"


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--format", "format_", default="peft", show_default=True, metavar="NAME", help="See `adapterkit plugins`."
)
@click.option(
    "--base",
    "base_dir",
    type=click.Path(path_type=Path),
    help="Base model folder (gguf: its config.json names the architecture and tensors; headers only).",
)
@click.option(
    "--pad-rank",
    type=int,
    metavar="N",
    help="peft: zero-pad every module to rank N with one r/lora_alpha (PEFT hotswap, vLLM).",
)
@click.option("--dtype", metavar="T", help="gguf: tensor type, f32 (default), f16 or bf16.")
@json_option
@click.pass_context
def export(
    ctx: click.Context,
    ref: str,
    dest: Path,
    format_: str,
    base_dir: Path | None,
    pad_rank: int | None,
    dtype: str | None,
) -> None:
    """Write the adapter REF at DEST in a format (a PEFT folder, byte-identical to the stored files, by default).

    `--format gguf --base BASE_DIR` writes DEST/adapter.gguf (or DEST itself when it ends in .gguf)
    for llama.cpp and Ollama. An export that rewrites the factors (gguf, --pad-rank) re-reads what it
    wrote and prints the largest relative difference between the deltas the target applies and the
    stored ones (the equivalence certificate).
    """
    store = _store(ctx)
    info = store.show(ref)
    given = {"base": base_dir, "pad_rank": pad_rank, "dtype": dtype}
    options = {key: value for key, value in given.items() if value is not None}
    with _progress("exporting", info["size"]) as progress:
        result = store.export(info["digest"], dest, format=format_, progress=progress, **options)

    def text() -> str:
        lines = [f"exported {info['digest']} to {result.path}"]
        if "certificate" in result.details:
            lines.append(_certificate_text(result.details["certificate"]))
        return "\n".join(lines)

    _emit(
        ctx,
        {
            "digest": info["digest"],
            "refs": info["refs"],
            "format": format_,
            "path": str(result.path),
            "files": info["files"],
            "written": [str(path) for path in result.files],
            **result.details,
        },
        text,
    )


def _stored_bytes(store: Store) -> int:
    total = 0
    for _, path in store.blobs:
        with suppress(OSError):  # gc may remove a blob while we add up
            total += path.stat().st_size
    return total


@cli.command()
@click.option("--full", is_flag=True, help="Re-hash every blob, even those verified before and unchanged since.")
@json_option
@click.pass_context
def verify(ctx: click.Context, full: bool) -> None:
    """Check every blob, manifest and ref; move corrupt objects to corrupt/. Exit 1 on any problem."""
    store = _store(ctx)
    total = _stored_bytes(store) if _is_terminal() else 0
    with _progress("hashing", total) as progress:
        report = store.verify(full=full, progress=progress)

    def text() -> str:
        lines = [
            f"checked {report.blobs} {_plural(report.blobs, 'blob')}, {report.manifests} "
            f"{_plural(report.manifests, 'manifest')}, {report.refs} {_plural(report.refs, 'ref')} "
            f"({human_size(report.hashed_bytes)} hashed)"
        ]
        lines += [f"problem: {p.kind} {p.path}: {p.message}" for p in report.problems]
        if report.stale_temp_files:
            count = report.stale_temp_files
            lines.append(f"note: {count} temp {_plural(count, 'file')} of interrupted writers (gc removes them)")
        if report.unmoved:
            count = len(report.unmoved)
            lines.append(
                f"note: the store cannot be written here, so {count} corrupt {_plural(count, 'object')} stayed "
                "in place (moving them to corrupt/ needs write access)"
            )
        count = len(report.problems)
        lines.append("ok" if report.ok else f"{count} {_plural(count, 'problem')} found")
        return "\n".join(lines)

    _emit(ctx, report.to_json(), text)
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what would be removed, remove nothing.")
@click.option("--grace", default="24h", show_default=True, help="Keep unreferenced objects younger than this.")
@json_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: str) -> None:
    """Remove adapters and files that no ref (or recent reflog entry) reaches."""
    try:
        seconds = adapterkit.parse_duration(grace)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grace") from None
    report = _store(ctx).gc(grace=seconds, dry_run=dry_run)

    def text() -> str:
        verb = "would remove" if dry_run else "removed"
        lines = [f"{verb} {path} ({human_size(size)})" for path, size in report.removed]
        count = len(report.removed)
        lines.append(f"{verb} {count} {_plural(count, 'file')}, {human_size(report.freed_bytes)}")
        young = report.young_manifests + report.young_blobs
        if young:
            lines.append(
                f"kept {young} unreachable {_plural(young, 'object')}: no ref points at them, but the grace period "
                f"({grace}) has not passed since they were written or unreferenced; --grace 0s removes them now"
            )
        return "\n".join(lines)

    _emit(ctx, report.to_json(), text)


@cli.command()
@click.argument("base_dir", type=click.Path(path_type=Path))
@click.option("--content", is_flag=True, help="Also hash every tensor's bytes (reads the whole model).")
@json_option
@click.pass_context
def fingerprint(ctx: click.Context, base_dir: Path, content: bool) -> None:
    """Print the fingerprint of the base model in BASE_DIR."""
    fp = adapterkit.fingerprint(base_dir, content=content)
    document = {"structure_digest": fp.structure_digest, "tensors": len(fp.tensors)}
    if content:
        document["content_digest"] = fp.content_digest
    _emit(
        ctx,
        document,
        lambda: "\n".join(f"{key}: {value}" for key, value in document.items()),
    )


@cli.command()
@click.argument("ref")
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Base model folder (only its config.json and safetensors headers are read).",
)
@json_option
@click.pass_context
def check(ctx: click.Context, ref: str, base_dir: Path) -> None:
    """Check that the adapter REF fits the base in BASE_DIR before deploying it; exit 1 on any problem.

    One line per problem: a module the base lacks or shapes differently, keys under a prefix the
    base does not use (loaders would ignore them), a resized vocabulary, a Conv1D layer taken the
    wrong way round, dtypes, and the base's fingerprint, name and revision against those recorded.
    """
    report = adapterkit.check(_store(ctx), ref, base_dir)

    def text() -> str:
        lines = [problem.message for problem in report.problems]
        modules = f"{report.modules} module{'s' if report.modules != 1 else ''}"
        if report.ok:
            lines.append(f"{ref} fits {report.base}: {modules} checked, no problem")
        else:
            count = len(report.problems)
            lines.append(f"{ref} does not fit {report.base}: {count} problem{'s' if count != 1 else ''} in {modules}")
        return "\n".join(lines)

    _emit(ctx, {"ref": ref, **report.to_json()}, text)
    if not report.ok:
        ctx.exit(1)


def _plan_text(plan: dict[str, Any]) -> str:
    ranks = plan["ranks"]
    known = plan["ranks_known"]
    rank_text = _span(ranks) if ranks is not None else "none"
    if not known:  # the dense strategies with --energy: each rank follows from the dense delta itself
        rank_text = "unknown until the dense deltas are formed" + (f" (known so far: {rank_text})" if ranks else "")
    count = len(plan["weights"])
    modules = plan["num_modules"]
    parameters, size = plan["output_parameters"], plan["output_bytes"]
    output = "unknown until the ranks are" if parameters is None else f"{parameters:,} parameters, {human_size(size)}"
    flops, peak = plan["flops"], plan["peak_bytes"]
    cost = "unknown" if flops is None else f"about {flops:.2e} FLOPs"
    cost += "" if peak is None else f", peak about {human_size(peak)}"
    lines = [
        f"plan: {plan['strategy']} of {count} {_plural(count, 'adapter')}, {modules} {_plural(modules, 'module')}, "
        f"output ranks {rank_text}",
        f"output: {output}",
        f"cost:   {cost}",
    ]
    lines += [f"note:   {note}" for note in plan["notes"]]
    for name, module in plan["modules"].items():
        error = module.get("truncation_error")
        extra = f"  error {error:.2e}" if error is not None else ""
        lines.append(f"  {name}  rank {module['rank'] if module['rank'] is not None else '?'}{extra}")
    return "\n".join(lines)


def _parse_weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    if len(weights) != count:
        raise click.BadParameter(f"{len(weights)} weights for {count} adapters", param_hint="--weights")
    return weights


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--param key=value``: JSON values (numbers, true/false, strings); a bare word is a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except (ValueError, RecursionError):
            params[key] = value
    return params


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--weights", "-w", metavar="W,...", help="One weight per adapter (negative allowed) [default: 1 each].")
@click.option("--strategy", "-s", default="linear", show_default=True, help="See `adapterkit plugins`.")
@click.option("--rank", type=int, help="Output rank (svd, ties, dare_*, magnitude_prune).")
@click.option("--energy", type=float, help="Per-module rank keeping this fraction of the energy (instead of --rank).")
@click.option("--density", type=float, help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
@click.option("--seed", type=int, help="Seed of DARE's random masks.")
@click.option("--param", "extra", multiple=True, metavar="KEY=VALUE", help="Any other strategy parameter.")
@click.option("--device", help="torch device for the maths, e.g. cuda [default: cpu].")
@click.option("--force", is_flag=True, help="Blend adapters made for different base models.")
@click.option("--tag", "-t", metavar="NAME[:TAG]", help="Ref for the result (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Print the plan (ranks, FLOPs, peak bytes) and store nothing.")
@json_option
@click.pass_context
def compose(
    ctx: click.Context,
    refs: tuple[str, ...],
    weights: str | None,
    strategy: str,
    rank: int | None,
    energy: float | None,
    density: float | None,
    seed: int | None,
    extra: tuple[str, ...],
    device: str | None,
    force: bool,
    tag: str | None,
    dry_run: bool,
) -> None:
    """Blend the adapters REFS into a new adapter and store it under --tag."""
    if tag is None and not dry_run:
        raise click.UsageError("Missing option '--tag' / '-t' (needed unless --dry-run).")
    if rank is not None and energy is not None:
        raise click.UsageError("--rank and --energy both choose the output rank: give one of them.")
    params = {
        k: v for k, v in {"rank": rank, "energy": energy, "density": density, "seed": seed}.items() if v is not None
    }
    params.update(_parse_params(extra))
    parsed_weights = _parse_weights(weights, len(refs))
    store = _store(ctx)
    parents = [store.get(ref) for ref in refs]
    if dry_run:
        plan = adapterkit.plan_compose(parents, parsed_weights, strategy, device=device, force=force, **params)
        _emit(ctx, plan, lambda: _plan_text(plan))
        return
    assert tag is not None
    with _lazy_progress("composing") as progress:
        blended = adapterkit.compose(
            parents, parsed_weights, strategy, device=device, force=force, progress=progress, **params
        )
    result = store.put(blended, tag)
    info = result.info
    errors = (info.get("lineage") or {}).get("truncation_error") or {}

    def text() -> str:
        line = (
            f"{result.ref} {result.digest} ({strategy} of {len(refs)} {_plural(len(refs), 'adapter')}, "
            f"{_modules_text(info)}){_was(result.previous)}"
        )
        if errors:
            worst = max(errors, key=errors.get)
            line += (
                f"\ntruncation error: max {errors[worst]:.2e} ({worst}), mean {sum(errors.values()) / len(errors):.2e}"
            )
        return line

    _emit(ctx, {**info, "ref": result.ref, "new_bytes": result.new_bytes, "previous": result.previous}, text)


#: How ``merge --dry-run`` names each kind of operation (``plan_merge``'s ``op``), in the order it lists them.
_MERGE_OPERATIONS = {
    "lora": "LoRA additions",
    "dora": "DoRA rescales",
    "bias": "LoRA bias additions",
    "replace": "tensors replaced by the adapter's copy",
    "rows": "token row sets replaced",
}


def _merge_operations_text(summary: dict[str, Any]) -> str:
    """The dry run's line of operations beyond plain LoRA additions, and the tensors it resizes; empty if none."""
    counts = summary["operations"]
    if set(counts) <= {"lora"}:
        return ""
    parts = [f"{counts[op]} {label}" for op, label in _MERGE_OPERATIONS.items() if counts.get(op)]
    lines = "\noperations: " + ", ".join(parts)
    for name, entry in summary["touched"].items():
        if "base_shape" in entry:
            lines += f"\nresized: {name} {entry['base_shape']} -> {entry['shape']}"
    for key, value in summary["config_updates"].items():
        lines += f"\nconfig.json: {key} = {value}"
    return lines


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--weights", "-w", metavar="W,...", help="One weight per adapter (negative allowed) [default: 1 each].")
@click.option(
    "--base", "base_dir", required=True, type=click.Path(path_type=Path), metavar="BASE_DIR", help="Base model folder."
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), metavar="OUT_DIR", help="New folder.")
@click.option("--dtype", help="Output dtype (bf16, fp16, fp32) [default: the base's].")
@click.option("--device", help="torch device for the additions, e.g. cuda [default: cpu].")
@click.option("--force", is_flag=True, help="Merge even when the adapters were made for another base.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (tensors touched, bytes, FLOPs, peak memory); write nothing."
)
@json_option
@click.pass_context
def merge(
    ctx: click.Context,
    refs: tuple[str, ...],
    weights: str | None,
    base_dir: Path,
    out_dir: Path,
    dtype: str | None,
    device: str | None,
    force: bool,
    dry_run: bool,
) -> None:
    """Bake the adapters REFS into the base model, streamed tensor by tensor, writing OUT_DIR."""
    parsed_weights = _parse_weights(weights, len(refs))
    store = _store(ctx)
    adapters = [store.get(ref) for ref in refs]
    if dry_run:
        summary = adapterkit.plan_merge(adapters, parsed_weights, base_dir, dtype=dtype, force=force, device=device)
        _emit(
            ctx,
            summary,
            lambda: (
                f"plan: {len(summary['merged_tensors'])} of {summary['tensors']} "
                f"{_plural(summary['tensors'], 'tensor')} change, {summary['shards']} "
                f"{_plural(summary['shards'], 'shard')}, {human_size(summary['bytes_written'])} to write to {out_dir}\n"
                f"cost: about {summary['flops']:.2e} FLOPs, peak about {human_size(summary['peak_bytes'])}"
                + _merge_operations_text(summary)
                + "".join(f"\nwarning: {w}" for w in summary["warnings"])
            ),
        )
        return
    with _lazy_progress("merging") as progress:
        report = adapterkit.merge(
            adapters, parsed_weights, base_dir, out_dir, dtype=dtype, device=device, force=force, progress=progress
        )
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)

    def text() -> str:
        return (
            f"merged {len(refs)} {_plural(len(refs), 'adapter')} into {report.out_dir}: "
            f"{len(report.merged_tensors)} of {report.tensors} {_plural(report.tensors, 'tensor')} changed, "
            f"{report.shards} {_plural(report.shards, 'shard')}, "
            f"{human_size(report.bytes_written)} written in {report.seconds:.1f} s"
        )

    _emit(ctx, report.to_json(), text)


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--weights", "-w", metavar="W,...", help="Weights for the interference and energy of the blend.")
@click.option("--rank-curve", is_flag=True, help="Include the whole energy-vs-rank curve of every module.")
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG (needs matplotlib)."
)
@click.option("--force", is_flag=True, help="Inspect adapters made for different base models together.")
@json_option
@click.pass_context
def inspect(
    ctx: click.Context,
    refs: tuple[str, ...],
    weights: str | None,
    rank_curve: bool,
    plot_path: Path | None,
    force: bool,
) -> None:
    """Spectra, effective ranks, pairwise interference and energy-vs-rank of adapters, before blending them."""
    store = _store(ctx)
    adapters = [store.get(ref) for ref in refs]
    report = adapterkit.inspect(
        adapters, _parse_weights(weights, len(refs)), rank_curve=rank_curve or bool(plot_path), force=force
    )
    if plot_path is not None:
        adapterkit.plot(report, plot_path)
    _emit(ctx, report, lambda: _inspect_text(report, refs, plot_path))


def _inspect_text(report: dict[str, Any], refs: tuple[str, ...], plot_path: Path | None) -> str:
    lines = []
    for ref, item in zip(refs, report["adapters"], strict=True):
        # A DoRA adapter's s*B@A is the direction of its update; its magnitude vectors set the norms.
        directional = item.get("update") == "directional"
        line = (
            f"{ref}: {_modules_text(item)}, "
            f"ranks {_span(item['ranks'])}, "
            f"mean effective rank {item['mean_effective_rank']:.1f}, "
            f"|{'directional update' if directional else 'delta'}| {item['frobenius_norm']:.3g}"
        )
        norms = [m["magnitude"]["norm"] for m in item["modules"].values() if "magnitude" in m]
        if directional:
            total = sum(norm**2 for norm in norms) ** 0.5
            line += f", DoRA: {_plural_count(len(norms), 'magnitude vector')}, |m| {total:.3g}"
        lines.append(line)
    if report.get("not_computed"):
        lines.append(f"interference and energy not computed: {report['not_computed']}")
    interference = report["interference"]
    if interference:
        for pair in interference["pairs"]:
            i, j = pair["adapters"]
            cosine = "n/a" if pair["cosine"] is None else f"{pair['cosine']:+.3f}"
            conflict = "n/a" if pair["sign_conflict"] is None else f"{pair['sign_conflict']:.1%}"
            lines.append(
                f"{refs[i]} x {refs[j]}: cosine {cosine} over {pair['shared_modules']} shared "
                f"{_plural(pair['shared_modules'], 'module')}, "
                f"sign conflicts {conflict}"
            )
    if report["energy"] is not None:
        overall = report["energy"]["overall"]
        kept = ", ".join(f"{float(k):.0%} at rank {v}" for k, v in overall["ranks_for_energy"].items())
        lines.append(f"energy of the {'blend' if len(refs) > 1 else 'adapter'} kept by svd --rank K: {kept}")
    if plot_path is not None:
        lines.append(f"plot written to {plot_path}")
    return "\n".join(lines)


def _refuse_memory(url: str, hint: str) -> None:
    """memory:// stores live inside one Python process: from the command line, nothing pushed there would persist."""
    from urllib.parse import urlsplit

    if urlsplit(url).scheme == "memory":
        raise click.BadParameter(
            f"{url!r}: a memory:// store lives only as long as one Python process, so the command line cannot "
            "use it; give a directory, file://, s3:// or hf:// URL",
            param_hint=hint,
        )


@cli.command()
@click.argument("ref")
@click.argument("dest")
@json_option
@click.pass_context
def push(ctx: click.Context, ref: str, dest: str) -> None:
    """Publish the adapter REF at DEST: a store root (file:///srv/ak, s3://bucket/prefix, a path),
    optionally DEST/NAME:TAG to rename, or hf://org/repo[@branch]. Only what DEST lacks is sent."""
    _refuse_memory(dest, "DEST")
    store = _store(ctx)
    info = store.show(ref)
    with _progress("pushing", info["size"]) as progress:
        result = adapterkit.push(store, ref, dest, progress=progress)
    _emit(
        ctx,
        {
            "digest": result.digest,
            "refs": info["refs"],
            "remote": result.ref,
            "transferred_bytes": result.transferred_bytes,
            "skipped_bytes": result.skipped_bytes,
        },
        lambda: (
            f"pushed {result.digest} to {result.ref} ({human_size(result.transferred_bytes)} sent, "
            f"{human_size(result.skipped_bytes)} already there)"
        ),
    )


@cli.command()
@click.argument("source")
@click.option("--tag", "-t", metavar="NAME[:TAG]", help="Local ref [default: the remote's name and tag].")
@json_option
@click.pass_context
def pull(ctx: click.Context, source: str, tag: str | None) -> None:
    """Fetch an adapter: SOURCE is REMOTE_ROOT/NAME[:TAG], REMOTE_ROOT/NAME@sha256:... or hf://org/repo[@revision]."""
    _refuse_memory(source, "SOURCE")
    store = _store(ctx)
    with _byte_counter("pulling") as progress:
        result = adapterkit.pull(store, source, tag, progress=progress)
    _emit(
        ctx,
        {
            "digest": result.digest,
            "refs": store.refs_by_digest().get(result.digest, []),
            "ref": result.ref,
            "transferred_bytes": result.transferred_bytes,
            "skipped_bytes": result.skipped_bytes,
        },
        lambda: (
            f"pulled {result.ref} {result.digest} ({human_size(result.transferred_bytes)} received, "
            f"{human_size(result.skipped_bytes)} already here)"
        ),
    )


@cli.command()
@json_option
@click.pass_context
def plugins(ctx: click.Context) -> None:
    """List plugins, and the strategies, remotes and formats they register."""
    loaded = adapterkit.get_plugins()
    strategies = loaded.strategies()
    strategy_owners = loaded.strategy_owners()
    remote_owners = loaded.remote_owners()
    formats = loaded.formats()
    format_owners = loaded.format_owners()
    document = {
        "plugins": [
            {"name": p.name, "version": p.version, "builtin": p.builtin, "hooks": list(p.hooks)} for p in loaded.info()
        ],
        "failed": loaded.failed,
        "strategies": [
            {
                "name": name,
                "plugin": strategy_owners[name],
                "description": strategy.description,
                "parameters": {
                    key: {"type": spec.type_name, "default": spec.default} for key, spec in strategy.params.items()
                },
            }
            for name, strategy in sorted(strategies.items())
        ],
        "remotes": [{"scheme": scheme, "plugin": owner} for scheme, owner in sorted(remote_owners.items())],
        "formats": [
            {
                "name": name,
                "plugin": format_owners[name],
                "description": fmt.description,
                "read": fmt.can_read,
                "write": fmt.can_write,
                "options": {
                    key: {"type": spec.type_name, "default": spec.default} for key, spec in fmt.options.items()
                },
            }
            for name, fmt in sorted(formats.items())
        ],
    }

    def text() -> str:
        lines = ["plugins:"]
        for p in document["plugins"]:
            version = f" {p['version']}" if p["version"] else ""
            lines.append(f"  {p['name']}{version}{' (built in)' if p['builtin'] else ''}: {', '.join(p['hooks'])}")
        for name, message in loaded.failed.items():
            lines.append(f"  {name}: FAILED: {message}")
        lines.append("strategies:")
        for item in document["strategies"]:
            params = ", ".join(f"{k}={v['default']}" for k, v in item["parameters"].items())
            lines.append(f"  {item['name']:<16} {item['description']}" + (f" [{params}]" if params else ""))
        lines.append("remotes:" + ("" if document["remotes"] else " none"))
        for item in document["remotes"]:
            lines.append(f"  {item['scheme']}://  ({item['plugin']})")
        lines.append("formats:")
        for item in document["formats"]:
            modes = "/".join(mode for mode in ("read", "write") if item[mode])
            options = ", ".join(f"{k}={v['default']}" for k, v in item["options"].items())
            lines.append(
                f"  {item['name']:<16} {modes:<10} {item['description']} ({item['plugin']})"
                + (f" [{options}]" if options else "")
            )
        return "\n".join(lines)

    _emit(ctx, document, text)


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to build the demo (a new temporary directory by default).",
)
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path | None) -> None:
    """Build a tiny base model and two adapters, store, inspect, export and check them.

    With --json, the running commentary goes to stderr and stdout gets one document: the folders
    the demo made and the adapters in its store."""
    from adapterkit.demo import run_demo  # the demo is a client of the public API, like this CLI

    as_json = _wants_json(ctx)
    root = run_demo(workdir, echo=(lambda line: click.echo(line, err=True)) if as_json else click.echo)
    if as_json:
        document = {
            "workdir": str(root),
            "base": str(root / "base"),
            "store": str(root / "store"),
            "adapters": Store(root / "store").list(),
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))


_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


def _parse_budget(text: str | None) -> int | None:
    """``--budget``: a number of parameters, with an optional k, M or G (``5M`` is 5,000,000)."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("_", "")
    scale = _SUFFIXES.get(cleaned[-1:].lower(), 1)
    number = cleaned[:-1] if scale != 1 else cleaned
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or not value.is_integer():
        raise click.BadParameter(
            f"{text!r} is not a whole, positive number of parameters (e.g. 500000 or 5M)", param_hint="--budget"
        )
    return int(value)


def _selection_text(selection: dict[str, Any]) -> str:
    if "rank" in selection:
        return f"at rank {selection['rank']}"
    if "energy" in selection:
        return f"keeping {selection['energy']:.4g} of each module's energy"
    return f"within {selection['budget']:,} parameters"


def _extract_plan_text(plan: dict[str, Any]) -> str:
    ranks, params, size = plan["ranks"], plan["parameters"], plan["adapter_bytes"]
    if params["min"] == params["max"]:
        amount = f"{params['max']:,} parameters, {human_size(size['max'])}"
    else:
        amount = f"at most {params['max']:,} parameters, {human_size(size['max'])}"
    lines = [
        f"plan: extract {plan['num_modules']} modules {_selection_text(plan['selection'])}",
        f"ranks:   {_span(ranks)}" + ("" if "rank" in plan["selection"] else " (decided by each module's spectrum)"),
        f"adapter: {amount} in {plan['dtype']}",
        f"reads:   {human_size(plan['read_bytes'])} of weights; {plan['compared_tensors']} tensors that are not "
        "targeted are compared and reported if changed",
    ]
    if plan["tied_embedding"]:
        lines.append(f"tied:    {plan['tied_embedding']} is both the input embedding and the output layer")
    for module in plan["modules"]:
        rank = module["rank"] if module["rank"] is not None else f"<= {module['max_rank']}"
        lines.append(f"  {module['name']}  {module['in']}->{module['out']}  rank {rank}")
    return "\n".join(lines)


def _extract_text(lineage: dict[str, Any], adapter: Any, first: str) -> str:
    errors, kept = lineage["truncation_error"], lineage["kept_energy"]
    ranks = sorted({module.spec.r for module in adapter.modules.values()})
    lines = [
        f"{first} (extract {_selection_text(lineage['parameters'])}: {len(adapter.modules)} modules, "
        f"ranks {_ranks_text(ranks)}, {adapter.num_parameters:,} parameters)"
    ]
    if errors:
        worst = max(errors, key=errors.get)
        norms = lineage["change_norm"]
        total = sum(norm**2 for norm in norms.values())
        overall = sum(kept[m] * norms[m] ** 2 for m in norms) / total if total else 1.0
        lines.append(
            f"error: max {errors[worst]:.2e} ({worst}), mean {sum(errors.values()) / len(errors):.2e}; "
            f"kept energy: {overall:.2%} overall, min {min(kept.values()):.2%}"
        )
    for key in sorted(adapter.extra_tensors):
        lines.append(f"carried in full: {key.removeprefix(adapter.key_prefix)}")
    for name, change in lineage["left_out"].items():
        lines.append(f"left out: {name} changed by {change:.2e} (relative), not targeted")
    if lineage["unchanged"]:
        lines.append(f"unchanged: {len(lineage['unchanged'])} targeted weights, not in the adapter")
    return "\n".join(lines)


@cli.command()
@click.option(
    "--base", "base_dir", required=True, type=click.Path(path_type=Path), metavar="BASE_DIR", help="Base model folder."
)
@click.option(
    "--tuned",
    "tuned_dir",
    required=True,
    type=click.Path(path_type=Path),
    metavar="TUNED_DIR",
    help="Fine-tuned model folder (same architecture).",
)
@click.option("--rank", type=int, help="One rank for every module.")
@click.option(
    "--energy", type=float, help="Per module, the smallest rank keeping this fraction of its change's energy."
)
@click.option(
    "--budget", metavar="PARAMS", help="Total parameters (e.g. 5M), given to the ranks that keep the most energy."
)
@click.option(
    "--targets",
    multiple=True,
    metavar="PATTERN",
    help="Module names or suffixes (q_proj, lm_head, all-linear), repeated or comma-separated [default: all-linear].",
)
@click.option(
    "--keep-changed",
    is_flag=True,
    help="Carry changed tensors that are not targeted (norms, biases) in full, as modules_to_save.",
)
@click.option("--dtype", help="dtype of the factors (fp32, bf16, fp16) [default: fp32].")
@click.option("--device", help="torch device for the maths, e.g. cuda [default: cpu].")
@click.option("--content-digest", is_flag=True, help="Record the fine-tuned model's content digest (reads it again).")
@click.option("--tag", "-t", metavar="NAME[:TAG]", help="Store the adapter under this ref.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR", help="Write it as a PEFT folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan from the headers; read no weight, write nothing.")
@json_option
@click.pass_context
def extract(
    ctx: click.Context,
    base_dir: Path,
    tuned_dir: Path,
    rank: int | None,
    energy: float | None,
    budget: str | None,
    targets: tuple[str, ...],
    keep_changed: bool,
    dtype: str | None,
    device: str | None,
    content_digest: bool,
    tag: str | None,
    out_dir: Path | None,
    dry_run: bool,
) -> None:
    """Turn the fine-tuned model TUNED_DIR into a LoRA adapter on BASE_DIR, streamed tensor by tensor."""
    given = [
        name for name, value in (("--rank", rank), ("--energy", energy), ("--budget", budget)) if value is not None
    ]
    if len(given) != 1:
        raise click.UsageError("Give exactly one of --rank, --energy or --budget.")
    if tag is None and out_dir is None and not dry_run:
        raise click.UsageError("Missing option '--tag' or '--out' (needed unless --dry-run).")
    patterns = [part.strip() for text in targets for part in text.split(",") if part.strip()] or None
    options = dict(
        rank=rank, energy=energy, budget=_parse_budget(budget), targets=patterns, keep_changed=keep_changed, dtype=dtype
    )
    if dry_run:
        plan = adapterkit.plan_extraction(base_dir, tuned_dir, **options).to_json()
        _emit(ctx, plan, lambda: _extract_plan_text(plan))
        return
    if out_dir is not None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise adapterkit.InvalidInputError(f"{out_dir}: already exists and is not an empty directory")
    with _lazy_progress("extracting") as progress:
        adapter = adapterkit.extract(
            base_dir, tuned_dir, **options, device=device, content_digest=content_digest, progress=progress
        )
    assert adapter.metadata is not None
    lineage = adapter.metadata["lineage"]
    document: dict[str, Any] = {"digest": None, "refs": [], "lineage": lineage, "out": None}
    firsts = []
    if tag is not None:
        result = _store(ctx).put(adapter, tag, message=f"extract {tuned_dir}")
        document = {**result.info, "ref": result.ref, "new_bytes": result.new_bytes, "out": None}
        firsts.append(f"{result.ref} {result.digest}")
    if out_dir is not None:
        adapterkit.write_adapter(adapter, out_dir)
        document["out"] = str(out_dir)
        firsts.append(f"wrote {out_dir}")
    _emit(ctx, document, lambda: _extract_text(lineage, adapter, ", ".join(firsts)))


def _load_plugin_commands() -> None:
    """Load plugins once for the CLI; their load warnings become one clean line each on stderr."""
    try:
        with _warnings_as_lines():
            adapterkit.get_plugins().register_commands(cli)
    except AdapterkitError as exc:  # e.g. ADAPTERKIT_STRICT_PLUGINS with a broken plugin
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


_load_plugin_commands()


def main() -> None:
    cli(prog_name="adapterkit")


if __name__ == "__main__":
    main()
