"""The ``README.md`` model card a push writes at the root of the Hub repository.

The Hub reads the YAML front matter: ``library_name: peft`` makes it offer PEFT loading code,
``base_model`` (with the ``base_model:adapter:<id>`` tag) links the adapter into the base model's
model tree, and the tags make adapters findable. ``base_model`` must be a Hub id: the Hub rejects a
card whose ``base_model`` is a local path (transformers#33922, peft#2124), which is what PEFT writes
for a base loaded from disk, so such a value is dropped rather than published.

The card depends only on the adapter (its metadata, digest and own README) and the repository,
never on the tag or the time, so pushing the same adapter again produces the same bytes and the
push finds nothing to commit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["hub_model_id", "model_card"]

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(?:/[A-Za-z0-9][\w.-]{0,95})?")
_FRONT_MATTER_RE = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_BEGIN = "<!-- adapterkit:begin -->"
_END = "<!-- adapterkit:end -->"
_SECTION_RE = re.compile(rf"\n*{re.escape(_BEGIN)}.*?{re.escape(_END)}\n?", re.S)
_ADAPTER_TAG = "base_model:adapter:"
_TAGS = ("adapterkit", "lora")
#: PEFT task type -> (Hub pipeline tag, transformers auto class), as PEFT's own card and loaders pair them.
_TASKS = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


def hub_model_id(name: object) -> str | None:
    """``name`` when it reads as a Hub model id (``org/name`` or ``name``), None for a local path or nothing.

    A path that exists here is a local path even when it is shaped like an id (``models/llama``):
    that is how transformers itself decides between the two.
    """
    if not isinstance(name, str):
        return None
    name = name.strip()
    if not _REPO_ID_RE.fullmatch(name) or ".." in name or "--" in name or name.endswith((".", "-")):
        return None
    return None if os.path.exists(name) else name


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a README; front matter that is no YAML mapping is dropped (the Hub would refuse it)."""
    match = _FRONT_MATTER_RE.match(text)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        data = None
    return (dict(data) if isinstance(data, dict) else {}), text[match.end() :]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def model_card(metadata: Mapping[str, Any], digest: str, repo_id: str, readme: bytes | None) -> bytes:
    """The card for the adapter ``digest`` published as ``repo_id``; ``readme`` is the adapter's own, if any.

    An own README keeps its text and its front matter, with the keys above set or corrected; its
    body gains an adapterkit section (replaced, not repeated, when the README came from an earlier
    push). Without one, the card describes the adapter from its metadata.
    """
    own = readme.decode("utf-8", "replace") if readme is not None else ""
    data, body = _split_front_matter(own)
    base = metadata.get("base_model") or {}
    base_id = hub_model_id(base.get("name"))
    # PEFT writes `base_model: ''` and a `base_model:adapter:` tag for a base it could not name.
    kept_bases = [b for b in _as_list(data.get("base_model")) if hub_model_id(b)]
    if base_id:
        kept_bases = [base_id, *(b for b in kept_bases if b != base_id)]
    if kept_bases:
        data["base_model"] = kept_bases[0] if len(kept_bases) == 1 else kept_bases
    else:
        data.pop("base_model", None)
    data["library_name"] = "peft"
    task = metadata.get("task_type")
    if task in _TASKS and "pipeline_tag" not in data:
        data["pipeline_tag"] = _TASKS[task][0]
    tags = [str(t) for t in _as_list(data.get("tags")) if not str(t).startswith(_ADAPTER_TAG)]
    wanted = [*_TAGS, *(f"{_ADAPTER_TAG}{b}" for b in kept_bases)]
    data["tags"] = sorted(set(tags) | set(wanted))
    front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    body = _SECTION_RE.sub("\n", body).strip("\n")
    if not body.strip():
        body = _default_body(metadata, repo_id)
    section = _section(metadata, digest, repo_id, base_id)
    return f"---\n{front}---\n\n{body}\n\n{section}\n".encode()


def _default_body(metadata: Mapping[str, Any], repo_id: str) -> str:
    base = (metadata.get("base_model") or {}).get("name")
    on = f" for `{base}`" if base else ""
    return f"# {repo_id.rsplit('/', 1)[-1]}\n\nA LoRA adapter{on}, published with adapterkit."


def _section(metadata: Mapping[str, Any], digest: str, repo_id: str, base_id: str | None) -> str:
    base = metadata.get("base_model") or {}
    targets = metadata.get("target_modules")
    targets_text = ", ".join(f"`{t}`" for t in targets) if isinstance(targets, list) else f"`{targets}`"
    rows = [
        ("digest", f"`{digest}`"),
        ("base model", f"`{base['name']}`" if base.get("name") else "not recorded"),
        ("rank (r)", str(metadata.get("r"))),
        ("lora_alpha", f"{metadata.get('lora_alpha')}" + (" (rsLoRA)" if metadata.get("use_rslora") else "")),
        ("target modules", targets_text),
        ("modules", str(len(metadata.get("modules") or []))),
        ("parameters", f"{metadata.get('num_parameters', 0):,}"),
        ("task type", str(metadata.get("task_type") or "none")),
    ]
    if base.get("revision"):
        rows.insert(2, ("base revision", f"`{base['revision']}`"))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    auto = _TASKS.get(str(metadata.get("task_type")), ("", "AutoModel"))[1]
    base_arg = f'"{base_id}"' if base_id else '"path/to/base-model"'
    code = (
        "```python\n"
        f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
        f"base = {auto}.from_pretrained({base_arg})\n"
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        "```"
    )
    return (
        f"{_BEGIN}\n## adapterkit\n\n{table}\n\nLoad it with PEFT:\n\n{code}\n\n"
        f"or fetch exactly this adapter, every file checked against its digest: "
        f"`adapterkit pull hf://{repo_id}`\n{_END}"
    )
