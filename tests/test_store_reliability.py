"""Crash safety and concurrency of the store, with real ``adapterkit`` processes.

* Random kills: real CLI processes (add, tag, gc --grace 0s) SIGKILLed after a seeded random delay.
* Every crash point: the same commands killed just before their 1st, 2nd, ... file-system call that
  changes something (write, fsync, link, rename, unlink, chmod, utime, rmdir), so the narrow windows
  between publishing steps, which random timing almost never hits, are each exercised once.
* Concurrency: many processes adding identical and different adapters, tagging, removing and reading,
  with ``gc --grace 1s`` and ``verify`` running beside them.

After every kill the store must verify clean (stale temp files are allowed), every object file must
hash to its name, and every ref that existed before must still resolve and load, holding either its old
value or the one the killed command was writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import torch

from adapterkit import Store
from adapterkit.formats.peft import read_adapter

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "adapterkit.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}

#: A fork server: imports adapterkit once, then for each job (a JSON line on stdin) forks a child that runs the
#: CLI command but SIGKILLs itself just before its N-th mutating os call (N = 0: never; the child then reports
#: how many such calls the command made). Replies with one JSON line per job: the child's exit code (-9 when
#: killed) and the count. Forking keeps each crash point at a few milliseconds instead of a process start-up.
CRASH_SERVER = r"""
import json, os, signal, sys
from adapterkit.cli import cli
from adapterkit import schema
import adapterkit.store.gc, adapterkit.store.verify
for name in (schema.ADAPTER_SCHEMA, schema.MANIFEST_SCHEMA):
    schema._validator(name)  # build the validators once, not in every child
MUTATING = ("write", "fsync", "link", "replace", "rename", "unlink", "chmod", "utime", "rmdir")
originals = {name: getattr(os, name) for name in MUTATING}
for line in sys.stdin:
    job = json.loads(line)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        calls = [0]
        def crash_before(fn):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                if calls[0] == job["point"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            return wrapper
        for name, fn in originals.items():
            setattr(os, name, crash_before(fn))
        code = 0
        try:
            cli.main(["--store", job["root"], *job["args"]], standalone_mode=False)
        except BaseException:
            code = 1
        for name, fn in originals.items():
            setattr(os, name, fn)
        os.write(write_end, str(calls[0]).encode())
        os._exit(code)
    os.close(write_end)
    count = os.read(read_end, 64).decode() or "0"
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "points": int(count)}), flush=True)
"""


class CrashServer:
    """Talks to one CRASH_SERVER process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
        )

    def run(self, root: Path, args: list[str], point: int) -> tuple[int, int]:
        """(exit code, number of crash points) of ``args`` run on ``root``, killed before crash point ``point``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"root": str(root), "args": args, "point": point}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["rc"], reply["points"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, "--store", str(root), *args], capture_output=True, text=True, env=ENV, timeout=120)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


class Originals:
    """What each stored digest must load as: digest -> state dict of the folder it came from."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def learn(self, digest: str, folder: Path) -> None:
        if digest not in self.tensors:
            self.tensors[digest] = read_adapter(folder).state_dict()

    def check(self, store: Store, ref: str, digest: str) -> None:
        loaded = store.get(ref)
        assert loaded.digest == digest
        want = self.tensors[digest]
        got = loaded.state_dict()
        assert sorted(got) == sorted(want), ref
        assert all(torch.equal(got[k], want[k]) for k in want), ref


def ref_values(store: Store) -> dict[str, str | None]:
    return {f"{name}:{tag}": store.refs.read(name, tag) for name, tag, _ in store.refs}


def assert_objects_hash_to_names(store: Store) -> None:
    """No partial object is ever visible: every file under blobs/ and manifests/ hashes to its name."""
    for top in (store.blobs.root, store.manifests.root):
        for path in top.rglob("*") if top.is_dir() else ():
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.parent.name + path.name, path


def assert_reflogs_consistent(store: Store, *, exact: bool) -> None:
    """Each ref holds its last logged value (``exact``), or, after a kill between log and ref, the one before."""
    for name, tag, entries in store.refs.all_logs():
        value = store.refs.read(name, tag)
        if not entries:  # killed after creating the log file, before its first line: the ref was never written
            assert value is None and not exact, (name, tag, value)
            continue
        allowed = {entries[-1].new} if exact else {entries[-1].new, entries[-1].old}
        assert value in allowed, (name, tag, value, entries[-3:])
        for before, after in itertools.pairwise(entries):
            chained = {before.new} if exact else {before.new, before.old}
            assert after.old in chained, f"{name}:{tag}: lost update between {before} and {after}"


def check_after_kill(store: Store, expected: dict[str, set[str | None]], originals: Originals) -> None:
    """The invariants that must hold whenever and wherever a command was killed."""
    report = store.verify()
    assert report.ok, report.problems
    assert_objects_hash_to_names(store)
    values = ref_values(store)
    for ref, allowed in expected.items():
        value = values.get(ref)
        assert value in allowed, (ref, value, allowed)
        if value is not None:
            originals.check(store, ref, value)
    assert_reflogs_consistent(store, exact=False)


def recover_and_check(store: Store, originals: Originals) -> None:
    """After any crash the store keeps working and a gc leaves no temp file behind."""
    store.gc(grace=0)
    assert not store.tmp.is_dir() or not any(store.tmp.iterdir())
    report = store.verify(full=True)
    assert report.ok and report.stale_temp_files == 0, report.problems
    for ref, digest in ref_values(store).items():
        assert digest is not None
        originals.check(store, ref, digest)


@dataclass
class Fixture:
    """A template store and the adapter folders the commands use."""

    root: Path
    folders: dict[str, Path]
    digests: dict[str, str]  # folder key -> its digest (without --base)
    originals: Originals = field(default_factory=Originals)


def build_fixture(tmp_path: Path, write_folder: Callable[..., Path], *, dim: int, modules: int) -> Fixture:
    """A store with refs a and b, an unreferenced old adapter for gc to sweep, and some spare folders."""
    folders = {
        key: write_folder(tmp_path / "src" / key, seed=seed, dim=dim, modules=modules)
        for key, seed in (("a", 1), ("b", 2), ("old", 3), ("new", 4))
    }
    scratch = Store(tmp_path / "scratch")
    digests = {key: scratch.add(folder).digest for key, folder in folders.items()}
    root = tmp_path / "template"
    store = Store(root)
    store.add(folders["a"], "a")
    store.add(folders["b"], "b")
    store.add(folders["old"], "old")
    store.remove("old")
    _age(store, 2 * 86400)
    fixture = Fixture(root=root, folders=folders, digests=digests)
    for key, folder in folders.items():
        fixture.originals.learn(digests[key], folder)
    return fixture


def _age(store: Store, seconds: float) -> None:
    when = time.time() - seconds
    for top in (store.blobs.root, store.manifests.root):
        for path in top.rglob("*"):
            if path.is_file():
                os.utime(path, (when, when))
    for path in store.refs.logs.rglob("*"):
        if path.is_file():
            lines = [line.split(" ", 3) for line in path.read_text().splitlines()]
            path.write_text("".join(f"{o} {n} {float(t) - seconds:.6f} {m}\n" for o, n, t, m in lines))


# -- every crash point -------------------------------------------------------------------------------------------------


def _commands(fx: Fixture) -> list[tuple[str, list[str], dict[str, set[str | None]]]]:
    """(label, CLI arguments, what each ref may hold after the command was killed anywhere)."""
    a, b, new = fx.digests["a"], fx.digests["b"], fx.digests["new"]
    return [
        ("add new over a", ["add", str(fx.folders["new"]), "--tag", "a"], {"a:latest": {a, new}, "b:latest": {b}}),
        ("re-add a as c", ["add", str(fx.folders["a"]), "--tag", "c"], {"a:latest": {a}, "c:latest": {None, a}}),
        ("re-add old", ["add", str(fx.folders["old"]), "--tag", "old"], {"old:latest": {None, fx.digests["old"]}}),
        ("tag b as a", ["tag", "b", "a"], {"a:latest": {a, b}, "b:latest": {b}}),
        ("rm b", ["rm", "b"], {"a:latest": {a}, "b:latest": {b, None}}),
        ("gc", ["gc", "--grace", "0s"], {"a:latest": {a}, "b:latest": {b}}),
    ]


def run_in_process(root: Path, *args: str) -> None:
    """The CLI command, run in this process (fast): what a user would run after the crash."""
    from adapterkit.cli import cli as command

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            command.main(["--store", str(root), *args], standalone_mode=False)
    except click.ClickException as exc:
        if not (args[0] == "rm" and exc.message.startswith("no ref ")):  # rm had already done its work
            raise


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs when there is one: the sweep runs ~140 commands, each fsyncing a dozen times.

    Page-cache semantics are the same for a SIGKILLed process on any file system, so nothing is lost.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="adapterkit-crash-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_kill_at_every_crash_point(fast_tmp: Path, write_folder: Callable[..., Path]) -> None:
    tmp_path = fast_tmp
    fx = build_fixture(tmp_path, write_folder, dim=64, modules=2)
    server = CrashServer()
    total_kills = 0
    try:
        for label, args, expected in _commands(fx):
            root = tmp_path / "count"
            shutil.copytree(fx.root, root)
            rc, points = server.run(root, args, 0)
            shutil.rmtree(root)
            assert rc == 0 and points >= 3, (label, rc, points)
            outcomes: Counter[tuple[str, ...]] = Counter()
            for point in range(1, points + 1):
                root = tmp_path / f"{label.replace(' ', '-')}-{point}"
                shutil.copytree(fx.root, root)
                rc, _ = server.run(root, args, point)
                assert rc == -signal.SIGKILL, (label, point, rc)
                total_kills += 1
                store = Store(root)
                try:
                    check_after_kill(store, expected, fx.originals)
                    outcomes[tuple(sorted(str(v)[:13] for v in ref_values(store).values()))] += 1
                    # the same command, run again to the end, succeeds, and gc cleans up what the kill left
                    run_in_process(root, *args)
                    recover_and_check(store, fx.originals)
                except AssertionError as exc:
                    raise AssertionError(f"{label}: killed before crash point {point}: {exc}") from None
            if label.startswith(("add new", "tag", "rm")):
                assert len(outcomes) == 2, (label, outcomes)  # both the old and the new state were seen
    finally:
        server.close()
    assert total_kills >= 60


# -- random kills ------------------------------------------------------------------------------------------------------


@dataclass
class KillStats:
    kills: int = 0
    #: kills after the command had changed something in the store (and before it finished)
    mid_write: int = 0
    completed: int = 0
    temp_left: int = 0
    by_op: Counter[str] = field(default_factory=Counter)


#: Runs a CLI command (argv[3:]) watching the os functions that change the file system (CRASH_SERVER's list): at
#: the first call it writes one byte to the file descriptor argv[2] (when not -1), and at the end it writes the
#: times of the first and the last call, on the monotonic clock every process shares, to the file argv[1] (when
#: not "-"). Nothing else changes: the command is the real CLI, in its own process.
WRITE_PROBE = r"""
import os, sys, time
MUTATING = ("write", "fsync", "link", "replace", "rename", "unlink", "chmod", "utime", "rmdir")
originals = {name: getattr(os, name) for name in MUTATING}
times_path, notify = sys.argv[1], int(sys.argv[2])
seen = []
def probe(fn):
    def wrapper(*args, **kwargs):
        if not seen:
            seen.append(time.monotonic())
            if notify >= 0:
                originals["write"](notify, b"w")
        try:
            return fn(*args, **kwargs)
        finally:
            seen[1:] = [time.monotonic()]
    return wrapper
for name, fn in originals.items():
    setattr(os, name, probe(fn))
from adapterkit.cli import cli
try:
    cli.main(sys.argv[3:], standalone_mode=False)
finally:
    for name, fn in originals.items():
        setattr(os, name, fn)
    if times_path != "-":
        with open(times_path, "w") as fh:
            fh.write(" ".join(map(str, seen)))
"""


def write_window(root: Path, *args: str) -> float:
    """How long the command goes on changing the store once it has begun: from its first to its last call that
    changes the file system. Measured on a copy, so the store itself is left as it was."""
    probe = Path(tempfile.mkdtemp(prefix="probe-"))
    try:
        copy = probe / "store"
        shutil.copytree(root, copy)
        command = [sys.executable, "-c", WRITE_PROBE, str(probe / "times"), "-1", "--store", str(copy), *args]
        subprocess.run(command, capture_output=True, env=ENV, timeout=120, check=True)
        first, last = (float(t) for t in (probe / "times").read_text().split())
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return last - first


def store_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the store: (size, mtime in ns), to see whether a killed command had changed anything."""
    out = {}
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            info = path.stat()
            out[path.relative_to(root).as_posix()] = (info.st_size, info.st_mtime_ns)
    return out


def random_kill_rounds(
    fx: Fixture,
    root: Path,
    write_folder: Callable[..., Path],
    *,
    kills: int,
    seed: int,
    max_rounds: int,
) -> KillStats:
    """Kill real CLI commands at a seeded random moment of their write window until ``kills`` died mid-flight.

    A kill time drawn over the whole run mostly lands in the start-up (imports), before the store is touched;
    one drawn at a fixed offset from the start misses windows of a few tens of milliseconds as start-up times
    vary. So each command's write window (first to last call that changes the file system) is measured
    first, and each killed command reports its first such call (WRITE_PROBE): the kill comes a random part
    of the window after it.
    """
    rng = random.Random(seed)
    store = Store(root)
    stats = KillStats()
    names = ["a", "b", "c", "team/x:v1"]
    probe_folder = write_folder(root.parent / "src" / "probe", seed=999, dim=1024, modules=4)
    windows = {
        "add": write_window(root, "add", str(probe_folder), "--tag", "a"),
        "tag": write_window(root, "tag", "a", "c"),
        "gc": write_window(root, "gc", "--grace", "0s"),
    }
    print("write windows (s):", {op: f"{length:.3f}" for op, length in windows.items()})
    for round_ in range(max_rounds):
        if stats.kills >= kills:
            break
        before = ref_values(store)
        expected: dict[str, set[str | None]] = {ref: {value} for ref, value in before.items()}
        op = rng.choice(["add", "add", "add", "tag", "gc"])
        if op == "add":
            target = rng.choice(names)
            if rng.random() < 0.5:
                key = f"r{round_}"
                folder = write_folder(root.parent / "src" / key, seed=1000 + round_, dim=1024, modules=4)
            else:
                key = rng.choice(["a", "b", "new"])
                folder = fx.folders[key]
            args = ["add", str(folder), "--tag", target]
        elif op == "tag":
            source = rng.choice(sorted(before))
            target = rng.choice(names)
            args = ["tag", source, target]
            folder = None
        else:
            args, target, folder = ["gc", "--grace", "0s"], "", None
        full = target if ":" in target else f"{target}:latest"
        if target:
            expected.setdefault(full, {None})
        state = store_state(root)
        began, notify = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITE_PROBE, "-", str(notify), "--store", str(root), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            pass_fds=(notify,),
        )
        os.close(notify)
        with os.fdopen(began, "rb") as pipe:
            first_write = pipe.read(1)  # b"" when the command ended without writing
        if first_write:
            time.sleep(rng.uniform(0, windows[op]))
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            stats.kills += 1
            stats.by_op[op] += 1
            stats.mid_write += store_state(root) != state
            if store.tmp.is_dir() and any(store.tmp.iterdir()):
                stats.temp_left += 1
        else:
            assert proc.returncode == 0, (args, stdout, stderr)
            stats.completed += 1
        if folder is not None:  # the digest the add would give: learn it from the folder, in-process, read-only
            digest = _digest_of(folder, root.parent / "scratch")
            fx.originals.learn(digest, folder)
            expected[full] |= {digest}
        elif op == "tag":
            expected[full] |= {before[source]}
        try:
            check_after_kill(store, expected, fx.originals)
        except AssertionError as exc:
            raise AssertionError(f"round {round_}: {args} killed: {exc}") from None
    return stats


def _digest_of(folder: Path, scratch: Path) -> str:
    return Store(scratch).add(folder).digest


def test_random_kills_of_add_tag_and_gc(tmp_path: Path, write_folder: Callable[..., Path]) -> None:
    fx = build_fixture(tmp_path, write_folder, dim=1024, modules=4)
    root = tmp_path / "store"
    shutil.copytree(fx.root, root)
    stats = random_kill_rounds(fx, root, write_folder, kills=50, seed=20240611, max_rounds=400)
    print(f"random kills: {stats}; {stats.mid_write} of {stats.kills} landed after the command's first write")
    assert stats.kills >= 50
    assert stats.mid_write >= stats.kills // 2, stats  # most kills hit the store mid-write, not the start-up
    assert {"add", "tag", "gc"} <= set(stats.by_op)
    recover_and_check(Store(root), fx.originals)


# -- concurrency -------------------------------------------------------------------------------------------------------

WORKER = r"""
import json, random, sys, time
from adapterkit.errors import AdapterkitError, ReferenceNotFoundError
from adapterkit import Store

root, wid, seed, count, folders, names, reads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    json.loads(sys.argv[5]), json.loads(sys.argv[6]), sys.argv[7] == "1"
if reads:
    import torch  # noqa: F401  (imported before the start signal, so all workers start together)
rng = random.Random(seed)
store = Store(root)
sys.stdin.read(1)  # wait for the start signal
log = []
for i in range(count):
    op = rng.choice(["add", "add", "add", "tag", "tag", "rm"] + (["get", "get"] if reads else []))
    entry = {"worker": wid, "i": i, "op": op}
    try:
        if op == "add":
            key = rng.choice(sorted(folders))
            entry.update(folder=key, ref=rng.choice(names))
            entry["digest"] = store.add(folders[key], entry["ref"]).digest
        elif op == "tag":
            entry.update(source=rng.choice(names), ref=rng.choice(names))
            entry["digest"] = store.tag(entry["source"], entry["ref"])
        elif op == "rm":
            entry["ref"] = rng.choice(names)
            entry["digest"] = store.remove(entry["ref"])
        else:
            entry["ref"] = rng.choice(names)
            adapter = store.get(entry["ref"])
            entry["digest"] = adapter.digest
            entry["tensors"] = len(adapter.state_dict())
        entry["ok"] = True
    except ReferenceNotFoundError as exc:
        entry.update(ok=False, expected=str(exc).startswith(("no ref ", "no adapter ")), error=str(exc))
    except AdapterkitError as exc:
        entry.update(ok=False, expected=False, error=f"{type(exc).__name__}: {exc}")
    log.append(entry)
print(json.dumps(log))
"""


def _gc_and_verify_loop(root: Path, workers: list[subprocess.Popen[str]], results: dict[str, Any]) -> None:
    """Runs ``gc --grace 1s`` and ``verify`` back to back (real CLI processes) until every worker has exited."""
    while any(w.poll() is None for w in workers):
        gc = cli(root, "--json", "gc", "--grace", "1s", check=False)
        results["gc"].append((gc.returncode, gc.stderr.strip()))
        verify = cli(root, "--json", "verify", check=False)
        results["verify"].append((verify.returncode, verify.stdout if verify.returncode else ""))


def _start_together(commands: list[list[str]]) -> Iterator[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for cmd in commands
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("g")
        proc.stdin.flush()
    yield from procs


def test_concurrent_writers_readers_and_gc(tmp_path: Path, write_folder: Callable[..., Path]) -> None:
    workers_n, ops = 10, 25
    folders = {f"f{i}": write_folder(tmp_path / "src" / f"f{i}", seed=i, dim=256, modules=4) for i in range(6)}
    scratch = Store(tmp_path / "scratch")
    expected_digest = {key: scratch.add(folder).digest for key, folder in folders.items()}
    originals = Originals()
    for key, folder in folders.items():
        originals.learn(expected_digest[key], folder)
    names = ["shared:a", "shared:b", "x/y:z", "solo"]
    root = tmp_path / "store"
    Store(root).add(folders["f0"], "shared:a")
    commands = [
        [
            sys.executable,
            "-c",
            WORKER,
            str(root),
            str(w),
            str(1000 + w),
            str(ops),
            json.dumps({k: str(v) for k, v in folders.items()}),
            json.dumps(names),
            "1" if w < 2 else "0",
        ]
        for w in range(workers_n)
    ]
    results: dict[str, Any] = {"gc": [], "verify": []}
    workers = list(_start_together(commands))
    looper = threading.Thread(target=_gc_and_verify_loop, args=(root, workers, results))
    looper.start()
    log: list[dict[str, Any]] = []
    for proc in workers:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        log += json.loads(stdout)
    looper.join(timeout=300)

    store = Store(root)
    unexpected = [e for e in log if not e["ok"] and not e["expected"]]
    assert not unexpected, unexpected[:5]
    assert sum(e["ok"] for e in log) >= workers_n * ops // 2
    assert results["gc"] and all(rc == 0 for rc, _ in results["gc"]), results["gc"]
    assert all(rc == 0 for rc, _ in results["verify"]), [out for rc, out in results["verify"] if rc][:1]

    # identical adapters give the same digest whoever adds them; every ref loads as what was added
    for entry in log:
        if entry["op"] == "add" and entry["ok"]:
            assert entry["digest"] == expected_digest[entry["folder"]], entry
        if entry["op"] == "get" and entry["ok"]:
            assert entry["digest"] in originals.tensors
    for ref, digest in ref_values(store).items():
        assert digest is not None
        originals.check(store, ref, digest)

    # no lost update: each log chains (every update saw the value the previous one wrote), the ref holds the
    # last value, every successful write is in its ref's log, and each successful rm is exactly one entry
    assert_reflogs_consistent(store, exact=True)
    logs = {f"{name}:{tag}": entries for name, tag, entries in store.refs.all_logs()}
    for entry in log:
        if entry["ok"] and entry["op"] in ("add", "tag"):
            full = entry["ref"] if ":" in entry["ref"] else f"{entry['ref']}:latest"
            assert entry["digest"] in {e.new for e in logs[full]}, entry
    for ref in names:
        full = ref if ":" in ref else f"{ref}:latest"
        removed = sum(1 for e in log if e["op"] == "rm" and e["ok"] and e["ref"] == ref)
        assert removed == sum(1 for e in logs.get(full, []) if e.new is None), ref

    # no corrupt blob, no temp file left by any (unkilled) writer, and verify clean
    assert_objects_hash_to_names(store)
    assert not any(store.tmp.iterdir())
    report = store.verify(full=True)
    assert report.ok, report.problems
    print(
        f"concurrency: {len(log)} ops ({Counter(e['op'] for e in log if e['ok'])} ok), "
        f"{len(results['gc'])} gc runs, {len(results['verify'])} verify runs"
    )


def test_objects_stay_intact_without_working_locks(tmp_path: Path, write_folder: Callable[..., Path]) -> None:
    """Correctness of objects never rests on a lock: with flock a no-op, concurrent adds still store intact objects."""
    folders = {f"f{i}": write_folder(tmp_path / "src" / f"f{i}", seed=i, dim=256, modules=4) for i in range(3)}
    root = tmp_path / "store"
    Store(root).add(folders["f0"], "seed")
    no_locks = "import fcntl; fcntl.flock = lambda fd, op: None\n" + WORKER
    sources = json.dumps({k: str(v) for k, v in folders.items()})
    commands = [
        [sys.executable, "-c", no_locks, str(root), str(w), str(w), "12", sources, json.dumps([f"w{w}", "shared"]), "0"]
        for w in range(8)
    ]
    log: list[dict[str, Any]] = []
    for proc in list(_start_together(commands)):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        log += json.loads(stdout)
    assert not [e for e in log if not e["ok"] and not e["expected"]]
    store = Store(root)
    assert_objects_hash_to_names(store)
    assert not any(store.tmp.iterdir())
    report = store.verify(full=True)
    assert report.ok, report.problems
    originals = Originals()
    for folder in folders.values():
        originals.learn(Store(tmp_path / "scratch").add(folder).digest, folder)
    for ref, digest in ref_values(store).items():
        assert digest is not None
        originals.check(store, ref, digest)
