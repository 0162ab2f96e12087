"""The ``adapterkit`` command: parse, call the public API, print text or ``--json``.

Every :class:`~adapterkit.errors.AdapterkitError` becomes one line on stderr and exit code 1,
in one place (:class:`_Group`); usage errors exit 2 as click does. Registry commands import
neither torch nor transformers, so ``adapterkit list`` starts fast.
"""

from __future__ import annotations

import json
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


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _warnings_as_lines():
                return super().invoke(ctx)
        except AdapterkitError as exc:
            message = " ".join(str(exc).split("\n"))
            raise click.ClickException(message) from None


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


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if total <= 0 or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@contextmanager
def _lazy_progress(label: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress bar for work whose total is known only at the first callback."""
    if not sys.stderr.isatty():
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
@json_option
@click.pass_context
def add(ctx: click.Context, path: Path, tag: str, base: Path | None) -> None:
    """Import the PEFT adapter folder PATH into the store."""
    store = _store(ctx)
    weights = path / "adapter_model.safetensors"
    total = weights.stat().st_size if weights.is_file() else 0
    with _progress("hashing", total) as progress:
        result = store.add(path, tag, base=base, progress=progress)
    document = {**result.info, "ref": result.ref, "new_bytes": result.new_bytes}
    _emit(
        ctx,
        document,
        lambda: (
            f"{result.ref} {result.digest} ({human_size(result.new_bytes)} new, "
            f"{result.info['num_modules']} modules, {result.info['num_parameters']:,} parameters)"
        ),
    )


@cli.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List the adapters that refs point at."""
    items = _store(ctx).list()

    def text() -> str:
        if not items:
            return "no adapters"
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
            f"parameters:  {info['num_parameters']:,} in {info['num_modules']} modules",
            f"size:        {human_size(info['size'])}",
        ]
        if info["carried"]:
            lines.append(f"carried:     {', '.join(info['carried'])} (kept as is, not interpreted)")
        lineage = info["lineage"]
        if lineage:
            parents = ", ".join(f"{_short(p['digest'])} x {p['weight']}" for p in lineage["parents"])
            lines.append(f"lineage:     {lineage['strategy']} of {parents}")
        lines.append("files:")
        for f in info["files"]:
            lines.append(f"  {f['name']:<28} {human_size(f['size']):>10}  {_short(f['digest'])}")
        lines.append("modules:")
        for m in info["modules"]:
            shape = f"{m['in']}->{m['out']}"
            lines.append(f"  {m['name']}  {m['kind']}  r={m['r']} alpha={m['alpha']} scaling={m['scaling']:g}  {shape}")
        return "\n".join(lines)

    _emit(ctx, info, text)


@cli.command()
@click.argument("ref")
@click.argument("new_ref", metavar="NAME[:TAG]")
@json_option
@click.pass_context
def tag(ctx: click.Context, ref: str, new_ref: str) -> None:
    """Point NAME[:TAG] at the adapter REF names."""
    digest = _store(ctx).tag(ref, new_ref)
    _emit(ctx, {"ref": new_ref, "digest": digest}, lambda: f"{new_ref} -> {digest}")


@cli.command()
@click.argument("ref", metavar="NAME[:TAG]")
@json_option
@click.pass_context
def rm(ctx: click.Context, ref: str) -> None:
    """Remove a ref. The adapter's data stays until `gc` finds nothing pointing at it."""
    digest = _store(ctx).remove(ref)
    _emit(ctx, {"removed": ref, "digest": digest}, lambda: f"removed {ref} (was {digest})")


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
    total = _stored_bytes(store) if sys.stderr.isatty() else 0
    with _progress("hashing", total) as progress:
        report = store.verify(full=full, progress=progress)

    def text() -> str:
        lines = [
            f"checked {report.blobs} blobs, {report.manifests} manifests, {report.refs} refs "
            f"({human_size(report.hashed_bytes)} hashed)"
        ]
        lines += [f"problem: {p.kind} {p.path}: {p.message}" for p in report.problems]
        if report.stale_temp_files:
            lines.append(f"note: {report.stale_temp_files} temp files of interrupted writers (gc removes them)")
        lines.append("ok" if report.ok else f"{len(report.problems)} problems found")
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
        lines.append(f"{verb} {len(report.removed)} files, {human_size(report.freed_bytes)}")
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
    rank_text = "unknown until the dense deltas are formed" if ranks is None else _span(ranks)
    lines = [
        f"plan: {plan['strategy']} of {len(plan['weights'])} adapters, {plan['num_modules']} modules, "
        f"output ranks {rank_text}",
        f"output: {plan['output_parameters']:,} parameters, {human_size(plan['output_bytes'])}",
        f"cost:   about {plan['flops']:.2e} FLOPs, peak about {human_size(plan['peak_bytes'])}",
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
    blended = adapterkit.compose(parents, parsed_weights, strategy, device=device, force=force, **params)
    result = store.put(blended, tag)
    info = result.info
    errors = (info.get("lineage") or {}).get("truncation_error") or {}

    def text() -> str:
        line = (
            f"{result.ref} {result.digest} ({strategy} of {len(refs)} adapters, "
            f"{info['num_modules']} modules, {info['num_parameters']:,} parameters)"
        )
        if errors:
            worst = max(errors, key=errors.get)
            line += (
                f"\ntruncation error: max {errors[worst]:.2e} ({worst}), mean {sum(errors.values()) / len(errors):.2e}"
            )
        return line

    _emit(ctx, {**info, "ref": result.ref, "new_bytes": result.new_bytes}, text)


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
                f"plan: {len(summary['merged_tensors'])} of {summary['tensors']} tensors change, "
                f"{summary['shards']} shards, {human_size(summary['bytes_written'])} to write to {out_dir}\n"
                f"cost: about {summary['flops']:.2e} FLOPs, peak about {human_size(summary['peak_bytes'])}"
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
            f"merged {len(refs)} adapter{'s' if len(refs) > 1 else ''} into {report.out_dir}: "
            f"{len(report.merged_tensors)} of {report.tensors} tensors changed, {report.shards} shards, "
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
        lines.append(
            f"{ref}: {item['num_modules']} modules, {item['num_parameters']:,} parameters, "
            f"ranks {_span(item['ranks'])}, "
            f"mean effective rank {item['mean_effective_rank']:.1f}, |delta| {item['frobenius_norm']:.3g}"
        )
    interference = report["interference"]
    if interference:
        for pair in interference["pairs"]:
            i, j = pair["adapters"]
            cosine = "n/a" if pair["cosine"] is None else f"{pair['cosine']:+.3f}"
            conflict = "n/a" if pair["sign_conflict"] is None else f"{pair['sign_conflict']:.1%}"
            lines.append(
                f"{refs[i]} x {refs[j]}: cosine {cosine} over {pair['shared_modules']} shared modules, "
                f"sign conflicts {conflict}"
            )
    overall = report["energy"]["overall"]
    kept = ", ".join(f"{float(k):.0%} at rank {v}" for k, v in overall["ranks_for_energy"].items())
    lines.append(f"energy of the {'blend' if len(refs) > 1 else 'adapter'} kept by svd --rank K: {kept}")
    if plot_path is not None:
        lines.append(f"plot written to {plot_path}")
    return "\n".join(lines)


@cli.command()
@click.argument("ref")
@click.argument("dest")
@json_option
@click.pass_context
def push(ctx: click.Context, ref: str, dest: str) -> None:
    """Publish the adapter REF at DEST: a store root (file:///srv/ak, s3://bucket/prefix, a path),
    optionally DEST/NAME:TAG to rename, or hf://org/repo[@branch]. Only what DEST lacks is sent."""
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
    store = _store(ctx)
    result = adapterkit.pull(store, source, tag)
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
def demo(workdir: Path | None) -> None:
    """Build a tiny base model and two adapters, store, inspect, export and check them."""
    from adapterkit.demo import run_demo  # the demo is a client of the public API, like this CLI

    run_demo(workdir, echo=click.echo)


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
