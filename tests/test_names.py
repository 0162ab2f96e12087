"""Reference syntax: what is accepted maps to a safe, unique path under refs/; everything else is refused cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterkit.errors import InvalidReferenceError
from adapterkit.store.names import (
    DEFAULT_TAG,
    DIGEST_RE,
    MAX_REF_LENGTH,
    NAME_RE,
    TAG_RE,
    Ref,
    digest_prefix,
    parse_ref,
    parse_tag_ref,
)
from adapterkit.store.refs import RefStore

HEX = "0123456789abcdef"
DIGEST = "sha256:" + "ab" * 32
REFS = RefStore(Path("/store"), Path("/store/tmp"))

components = st.from_regex(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*", fullmatch=True).filter(lambda c: len(c) <= 40)
names = st.lists(components, min_size=1, max_size=4).map("/".join).filter(lambda n: n != "sha256")
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", fullmatch=True)
nasty = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="aZ09._-/:@\x00 \\\n", max_size=60),
    st.builds("".join, st.lists(st.sampled_from(["a", "..", ".", "/", ":", "@", "\x00", "A", "_", "-", "x" * 130]))),
)


def assert_safe(ref: Ref, text: str) -> None:
    """An accepted tag ref is valid OCI syntax and its file stays strictly inside refs/."""
    assert ref.name is not None and ref.tag is not None
    assert NAME_RE.fullmatch(ref.name) and TAG_RE.fullmatch(ref.tag)
    assert len(text) <= MAX_REF_LENGTH and "\x00" not in text
    path = REFS.path(ref.name, ref.tag)
    parts = path.relative_to(REFS.refs).parts
    assert all(part not in ("", ".", "..") for part in parts)
    assert os.path.normpath(path) == str(path)  # nothing for the OS to collapse
    assert "_tags" not in ref.name.split("/")  # the tag directory cannot be reached through a name


@settings(max_examples=1000, deadline=None)
@given(text=nasty)
def test_any_text_is_either_a_safe_ref_or_a_clear_error(text: str) -> None:
    for parse in (parse_tag_ref, parse_ref):
        try:
            ref = parse(text)
        except InvalidReferenceError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        if ref.name is not None and ref.tag is not None:
            assert_safe(ref, text)
        elif ref.digest is not None:
            assert DIGEST_RE.fullmatch(ref.digest)
        else:
            assert ref.prefix is not None and 4 <= len(ref.prefix) <= 64 and set(ref.prefix) <= set(HEX)


@settings(max_examples=150, deadline=None)
@given(name=names, tag=st.one_of(st.none(), tags))
def test_valid_refs_round_trip(name: str, tag: str | None) -> None:
    text = name if tag is None else f"{name}:{tag}"
    if len(text) > MAX_REF_LENGTH:
        with pytest.raises(InvalidReferenceError, match="limit is 255"):
            parse_tag_ref(text)
        return
    ref = parse_tag_ref(text)
    assert ref == Ref(name=name, tag=tag or DEFAULT_TAG)
    assert str(ref) == f"{name}:{tag or DEFAULT_TAG}"
    assert parse_ref(text) == ref
    assert_safe(ref, text)
    if len(name) + 71 <= MAX_REF_LENGTH:
        pinned = parse_ref(f"{name}@{DIGEST}")
        assert pinned == Ref(name=name, digest=DIGEST) and str(pinned) == f"{name}@{DIGEST}"


@settings(max_examples=100, deadline=None)
@given(a=st.tuples(names, tags), b=st.tuples(names, tags))
def test_distinct_refs_never_share_a_file(a: tuple[str, str], b: tuple[str, str]) -> None:
    if a != b:
        assert REFS.path(*a) != REFS.path(*b)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "..",
        ".",
        "../x",
        "a/../b",
        "a/./b",
        "/abs",
        "/",
        "a/",
        "a//b",
        "-a",
        "a-",
        "a..b",
        "a._b",
        "Upper",
        "camelCase/x",
        "a\x00b",
        "a:b\x00",
        "a b",
        "a:",
        "a:b:c",
        "a:.x",
        "a:-x",
        "a:" + "t" * 129,
        "x" * 256,
        "a@b",
        "a@sha256:12",
        f"A@{DIGEST}",
        "sha256:xyz",
        "sha256:abc",
        "sha256:" + "a" * 65,
        "ñame",
        "a:tåg",
        "a/_tags:x",
        "sha256",
        "sha256:latest",
    ],
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as exc:
        parse_ref(text)
    assert "\n" not in str(exc.value)
    with pytest.raises(InvalidReferenceError):
        parse_tag_ref(text)


def test_reference_forms() -> None:
    assert parse_ref("llama") == Ref(name="llama", tag="latest")
    assert parse_ref("org/team/llama-3_chat.v2:Release-1.0") == Ref(name="org/team/llama-3_chat.v2", tag="Release-1.0")
    assert parse_ref("a__b--c:_x") == Ref(name="a__b--c", tag="_x")
    assert parse_ref(DIGEST) == Ref(digest=DIGEST)
    assert parse_ref("sha256:abcd") == Ref(prefix="abcd")
    assert parse_ref(f"llama@{DIGEST}") == Ref(name="llama", digest=DIGEST)
    assert parse_ref("abcd") == Ref(name="abcd", tag="latest")  # a name first; Store.resolve falls back to a prefix
    assert digest_prefix("abcd") == "abcd" and digest_prefix("abc") is None and digest_prefix("abcg") is None
    with pytest.raises(InvalidReferenceError, match="cannot be written to"):
        parse_tag_ref(f"llama@{DIGEST}")
    with pytest.raises(InvalidReferenceError, match="limit is 255"):
        parse_ref("a" * 256)
    assert parse_tag_ref("a" * 255) == Ref(name="a" * 255, tag="latest")
    assert parse_tag_ref("a:" + "T" * 128).tag == "T" * 128
    assert parse_ref("sha256/x") == Ref(name="sha256/x", tag="latest")  # only the bare name is reserved
