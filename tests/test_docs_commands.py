"""Every command the docs show works, as a new user would type it, and prints what the docs show.

Each ```console block of README.md and docs/*.md is run, block after block, in one bash session per
file, in a fresh directory where ``.venv`` is a link to this project's virtual environment (so the
README's ``.venv/bin/adapterkit`` and ``source .venv/bin/activate`` work verbatim) and the venv's
``bin`` is on PATH. A line ``$ COMMAND`` is a command; the lines up to the next ``$ `` are what it
prints (stdout and stderr together, in order). A command must exit 0 unless the output shown
contains an ``Error:`` line. A ```python block written as a ``>>>`` session is run with doctest
at its place in the session (same directory and environment).

Not run: docs/index.md (a generated copy of README.md, see tests/test_docs.py), docs/cli.md (the
generated ``--help`` reference), docs/errors.md (its examples are fragments of error output).

Every page but the README continues from the README's tour: its session starts from a copy of the
folder the README's session ended in, with the environment variables and working directory that
session ended with (venv activated, ``ADAPTERKIT_HOME`` set), as a reader who did the tour has.

Normalization, the only differences allowed between the output shown and the output printed:

* trailing whitespace on a line is ignored;
* a duration ``in 1.2 s`` matches any duration;
* the session's directory is printed as ``/tmp/readme`` (and ``/tmp/readme`` in a command means it);
* a line that is exactly ``...`` in the docs matches any run of lines, including none;
* docs/remotes.md: the S3 and Hub endpoints its ``export`` lines name are those of the local servers
  the test starts (moto, and olah + tests/hub_server.py) on free ports: the endpoint is replaced in
  the commands, and the server's endpoint by the doc's in the output.

What the page says about those servers is set up here: the S3 buckets its commands name exist, the
Hub takes writes only with the token the page exports and holds some-org/some-peft-adapter, a PEFT
adapter tagged v1.0. docs/plugins.md: its example plugin is installed first (see ``_plugins_setup``).
A server that cannot start fails the test.

Digests, sizes, counts and everything else must match exactly.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
#: The directory the docs show for the session's working directory.
DOC_DIR = "/tmp/readme"
NOT_RUN = {"index.md", "cli.md", "errors.md"}
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name not in NOT_RUN)]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
DURATION = re.compile(r"\bin \d+(?:\.\d+)? s\b")
SESSION_TIMEOUT = 300


# -- parsing -----------------------------------------------------------------------------------------------


@dataclass
class Block:
    lang: str
    text: str
    line: int  #: line number of the block's first content line in the file


@dataclass
class Step:
    """One command (or one doctest session) and the output the docs show for it."""

    doc: str
    line: int
    block: int
    command: str
    expected: list[str]
    doctest: bool = False


def blocks(text: str) -> list[Block]:
    return [Block(m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in FENCE.finditer(text)]


def steps(doc: str, text: str) -> list[Step]:
    out: list[Step] = []
    for index, block in enumerate(blocks(text)):
        if block.lang == "console":
            lines = block.text.splitlines()
            assert lines and lines[0].startswith("$ "), f"{doc}:{block.line}: a console block starts with '$ COMMAND'"
            for offset, line in enumerate(lines):
                if line.startswith("$ "):
                    out.append(Step(doc, block.line + offset, index, line[2:], []))
                else:
                    out[-1].expected.append(line)
        elif block.lang in ("python", "pycon") and block.text.lstrip().startswith(">>> "):
            out.append(Step(doc, block.line, index, block.text, [], doctest=True))
    return out


def read(doc: str) -> str:
    return (ROOT / doc).read_text("utf-8")


# -- running -----------------------------------------------------------------------------------------------

DOCTEST_RUNNER = """\
import doctest, sys
doc, line, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path, encoding="utf-8").read()
test = doctest.DocTestParser().get_doctest(text, {"__name__": "__main__"}, doc, doc, line - 1)
runner = doctest.DocTestRunner(optionflags=doctest.REPORT_UDIFF)
runner.run(test)
sys.exit(1 if runner.failures or not runner.tries else 0)
"""


@dataclass
class Session:
    """Where and how one file's commands run."""

    doc: str
    workdir: Path
    scratch: Path  #: outside workdir: the script, doctest blocks, captured state
    env: dict[str, str]
    #: doc text -> what it stands for in this run (replaced in commands; reversed in output)
    subs: dict[str, str] = field(default_factory=dict)
    #: where the shell starts (default: workdir)
    cwd: Path | None = None


@dataclass
class Outcome:
    problems: list[str]
    env: dict[str, str]
    cwd: str


def base_env(home: Path) -> dict[str, str]:
    """A new user's shell: nothing from this machine's environment but a PATH with the venv first."""
    return {
        "PATH": f"{VENV / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "dumb",
        "TMPDIR": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "Agg",
    }


def normalize(line: str) -> str:
    return DURATION.sub("in <duration> s", line.rstrip())


def matches(expected: list[str], actual: list[str]) -> bool:
    pattern = "".join(r"(?:[^\n]*\n)*?" if line == "..." else re.escape(normalize(line)) + r"\n" for line in expected)
    return re.fullmatch(pattern, "".join(normalize(line) + "\n" for line in actual)) is not None


def run_session(session: Session, doc_steps: list[Step]) -> Outcome:
    """Run ``doc_steps`` in one bash process; compare each command's output with the docs."""
    mark = f"@@docs-{uuid.uuid4().hex}@@"
    scratch = session.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "run_doctest.py").write_text(DOCTEST_RUNNER, "utf-8")
    script = ["exec 2>&1 </dev/null", f"cd {_q(session.cwd or session.workdir)}"]
    ran: list[tuple[int, Step]] = []
    for index, step in enumerate(doc_steps):
        if step.doctest:
            block = scratch / f"block-{index}.txt"
            block.write_text(step.command, "utf-8")
            command = f"python {_q(scratch / 'run_doctest.py')} {_q(step.doc)} {step.line} {_q(block)}"
        else:
            command = _substitute(step.command, {DOC_DIR: str(session.workdir), **session.subs})
        script += [f"printf '%s begin {index}\\n' '{mark}'", command, f"printf '\\n%s end {index} %d\\n' '{mark}' $?"]
        ran.append((index, step))
    script += [f"env -0 > {_q(scratch / 'env')}", f"pwd > {_q(scratch / 'cwd')}"]
    (scratch / "session.sh").write_text("\n".join(script) + "\n", "utf-8")
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", str(scratch / "session.sh")],
        env=session.env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        timeout=SESSION_TIMEOUT,
        check=False,
    )
    printed = result.stdout.decode("utf-8", "replace")
    back = {str(session.workdir.resolve()): DOC_DIR, str(session.workdir): DOC_DIR}
    back.update({actual: shown for shown, actual in session.subs.items()})
    problems = []
    for index, step in ran:
        found = re.search(
            rf"{re.escape(mark)} begin {index}\n(.*?){re.escape(mark)} end {index} (\d+)\n", printed, re.S
        )
        where = f"{step.doc}:{step.line}: " + ("the >>> session" if step.doctest else f"$ {step.command}")
        if found is None:
            problems.append(f"{where}\n  did not run: the shell stopped before it (exit {result.returncode})")
            break
        output = found.group(1).removesuffix("\n")
        actual = [_substitute(line, back) for line in output.splitlines()]
        status = int(found.group(2))
        if step.doctest:
            if status != 0:
                problems.append(f"{where}\n  the doctest failed:\n" + "\n".join(actual))
            continue
        failed = status != 0 and not any(line.startswith("Error:") for line in step.expected)
        if failed or not matches(step.expected, actual):
            diff = difflib.unified_diff(step.expected, actual, f"shown in {step.doc}", "printed", lineterm="", n=2)
            note = f"  exit status {status}\n" if failed else ""
            problems.append(f"{where}\n{note}" + "\n".join(f"  {line}" for line in diff))
    env: dict[str, str] = {}
    if (scratch / "env").exists():
        for item in (scratch / "env").read_bytes().decode("utf-8", "replace").split("\0"):
            key, sep, value = item.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                env[key] = value
    cwd = (scratch / "cwd").read_text().strip() if (scratch / "cwd").exists() else str(session.workdir)
    return Outcome(problems, env, cwd)


def _q(value: object) -> str:
    return "'" + str(value).replace("'", "'\\''") + "'"


def _substitute(text: str, subs: dict[str, str]) -> str:
    for old, new in sorted(subs.items(), key=lambda item: -len(item[0])):
        text = text.replace(old, new)
    return text


# -- per-page set-up ---------------------------------------------------------------------------------------


def _plugins_setup(session: Session, stack: contextlib.ExitStack) -> None:
    """docs/plugins.md: install the page's own example plugin, as ``pip install`` of its package would.

    The package is made from the page: its name, version and entry points from the pyproject.toml block,
    its module from the python blocks that implement ``register_strategies``, ``register_formats`` or
    ``register_commands``.
    The module and a ``.dist-info`` (what pip writes, found by importlib.metadata) go in a directory on
    PYTHONPATH.
    """
    page = blocks(read(session.doc))
    project = tomllib.loads(next(b.text for b in page if b.lang == "toml"))["project"]
    entry_points = project["entry-points"]["adapterkit"]
    (module,) = set(entry_points.values())
    hooks = r"def register_(strategies|formats|commands)\("
    code = "\n\n".join(b.text for b in page if b.lang == "python" and re.search(hooks, b.text))
    site = session.scratch / "site-packages"
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", "utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[adapterkit]\n" + "".join(f"{name} = {value}\n" for name, value in entry_points.items()), "utf-8"
    )
    (site / f"{module}.py").write_text(code, "utf-8")
    session.env["PYTHONPATH"] = str(site)


def _export(text: str, variable: str) -> str | None:
    found = re.search(rf"^\$ export\b.*\b{variable}=(\S+)", text, re.M)
    return found.group(1) if found else None


def _remotes_setup(session: Session, stack: contextlib.ExitStack) -> None:
    """docs/remotes.md: an S3 server (moto) and a Hub (olah + the write front-end) on 127.0.0.1.

    Both are test dependencies: a server that cannot start fails the test (the page's commands would
    otherwise go unchecked while the suite stays green).
    """
    text = read(session.doc)
    s3_endpoint = _export(text, "AWS_ENDPOINT_URL")
    if s3_endpoint is not None:
        session.subs[s3_endpoint] = _start_s3(text, stack)
    hub_endpoint = _export(text, "HF_ENDPOINT")
    if hub_endpoint is not None:
        session.subs[hub_endpoint] = _start_hub(text, session.scratch / "hub", stack)


def _start_s3(text: str, stack: contextlib.ExitStack) -> str:
    """moto's server on a free port, with the buckets the page's commands name (a push makes no bucket)."""
    import boto3
    import s3fs  # noqa: F401  (what adapterkit's s3:// remote needs)
    from s3_server import S3TestServer

    server = S3TestServer()
    server.start()
    stack.callback(server.stop)
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    commands = "\n".join(b.text for b in blocks(text) if b.lang == "console")
    for bucket in sorted(set(re.findall(r"s3://([a-z0-9.-]+)", commands))):
        client.create_bucket(Bucket=bucket)
    return server.endpoint


#: A PEFT adapter repo published without adapterkit, which the page pulls.
SEEDED_REPO, SEEDED_TAG = "some-org/some-peft-adapter", "v1.0"


def _start_hub(text: str, root: Path, stack: contextlib.ExitStack) -> str:
    """olah + the write front-end; writes need the token the page exports; the page's third-party repo is seeded."""
    from hub_server import HubServer

    hub = HubServer(root)
    hub.start()
    stack.callback(hub.stop)
    hub.require_token = _export(text, "HF_TOKEN")
    hub.seed(SEEDED_REPO, _peft_adapter_files(), message="Upload adapter", tags=(SEEDED_TAG,))
    return hub.endpoint


def _peft_adapter_files() -> dict[str, bytes]:
    """A small LoRA (r=4 on q_proj and v_proj of 2 layers) as PEFT writes it.

    The factors are exact functions of their position (no random generator, whose stream may change
    between numpy versions), so the adapter's digest never changes.
    """
    import numpy as np

    from adapterkit.files.safetensors import serialize

    tensors = {}
    for layer in range(2):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            for factor, shape in (("lora_A", (4, 64)), ("lora_B", (out, 4))):
                n = len(tensors) + 1
                values = (np.arange(shape[0] * shape[1], dtype=np.int64) * 7919 * n) % 2001 - 1000
                data = (values.astype(np.float32) / np.float32(1000)).reshape(shape).tobytes()
                tensors[f"{key}.{factor}.weight"] = ("F32", shape, data)
    config = {
        "base_model_name_or_path": "some-org/some-base",
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }
    return {
        "adapter_config.json": json.dumps(config, indent=2).encode(),
        "adapter_model.safetensors": serialize(tensors),
    }


SETUP: dict[str, Callable[[Session, contextlib.ExitStack], None]] = {
    "docs/plugins.md": _plugins_setup,
    "docs/remotes.md": _remotes_setup,
}


# -- tests -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def readme_session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Session, Outcome]:
    """The README's tour, run once: its outcome, and where every other page starts from."""
    if not (VENV / "bin" / "adapterkit").exists():
        pytest.skip(f"no virtual environment with adapterkit at {VENV}")
    root = tmp_path_factory.mktemp("docs-README.md")
    workdir = root / "readme"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(VENV)
    (root / "home").mkdir()
    session = Session("README.md", workdir, root / "scratch", base_env(root / "home"))
    return session, run_session(session, steps("README.md", read("README.md")))


def _continue_from(readme: tuple[Session, Outcome], doc: str, root: Path) -> Session:
    """A copy of the folder and environment the README's session ended with."""
    first, outcome = readme
    workdir = root / "readme"
    shutil.copytree(first.workdir, workdir, symlinks=True)
    (root / "home").mkdir()
    moved = {str(first.workdir): str(workdir), first.env["HOME"]: str(root / "home")}
    env = {key: _substitute(value, moved) for key, value in (outcome.env or first.env).items()}
    env.pop("OLDPWD", None)
    env["PWD"] = _substitute(outcome.cwd, moved)
    return Session(doc, workdir, root / "scratch", env, cwd=Path(env["PWD"]))


@pytest.mark.parametrize("doc", [d for d in DOCS if steps(d, read(d))])
def test_doc_commands_print_what_the_doc_shows(
    doc: str, readme_session: tuple[Session, Outcome], tmp_path: Path
) -> None:
    if doc == "README.md":
        outcome = readme_session[1]
    else:
        session = _continue_from(readme_session, doc, tmp_path)
        with contextlib.ExitStack() as stack:
            SETUP.get(doc, lambda s, st: None)(session, stack)
            outcome = run_session(session, steps(doc, read(doc)))
    problems = outcome.problems
    if problems and doc != "README.md" and readme_session[1].problems:
        problems = [*problems, "(the README's session, which this page continues, failed too)"]
    if problems:
        message = f"{len(problems)} command(s) in {doc} do not print what it shows:\n\n" + "\n\n".join(problems)
        pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("doc", DOCS)
def test_shell_examples_are_console_blocks(doc: str) -> None:
    """A ``$ command`` in another kind of block would never be run by the test above."""
    hidden = [
        f"{doc}:{b.line}"
        for b in blocks(read(doc))
        if b.lang != "console" and any(line.startswith("$ ") for line in b.text.splitlines())
    ]
    assert not hidden, f"'$ ' commands outside ```console blocks: {hidden}"


def test_normalization_is_narrow() -> None:
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "b"], ["a", "b"])
    assert matches(["merged in 0.0 s"], ["merged in 12.75 s  "])
    assert not matches(["8 of 21 tensors"], ["8 of 22 tensors"])
    assert not matches(["a", "..."], ["b", "c"])
    assert not matches(["sha256:8fb18dd080f5"], ["sha256:8fb18dd080f6"])
