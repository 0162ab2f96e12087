"""PEFT folders in and out, with PEFT as the oracle.

The promise is: whatever adapterkit reads and writes back, ``PeftModel.from_pretrained`` loads to the
same model (same logits), and the bytes written are canonical. Every refusal is an
:class:`AdapterFormatError` with one line naming the file, and no pickle is ever really unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import (
    LLAMA_LORA_CASES,
    assert_one_line,
    conv_input,
    header_bytes,
    load_peft,
    logits,
    make_lora,
    max_abs_diff,
    save_lora,
    tiny_conv_net,
    tiny_gpt2,
    tiny_llama,
)
from safetensors.torch import load_file

from adapterkit.adapter.model import tensors_to_bytes
from adapterkit.errors import AdapterFormatError, UnsupportedAdapterError
from adapterkit.files.safetensors import iter_canonical_bytes, read_header
from adapterkit.formats.peft import (
    BIN_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    config_bytes,
    load_bin,
    open_folder,
    read_adapter,
    write_adapter,
)

LOGITS_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _round_trip(peft_model, tmp_path, *, safe_serialization: bool = True):
    """PEFT saves; adapterkit reads and writes; returns (adapter, original folder, adapterkit's folder)."""
    original = tmp_path / "peft"
    peft_model.save_pretrained(original, safe_serialization=safe_serialization)
    adapter = read_adapter(original)
    written = write_adapter(adapter, tmp_path / "adapterkit")
    return adapter, original, written


@pytest.mark.parametrize("case", sorted(LLAMA_LORA_CASES))
def test_llama_round_trip_gives_peft_the_same_logits(case, llama, tmp_path):
    peft_model = make_lora(llama, **LLAMA_LORA_CASES[case])
    expected = logits(peft_model)
    assert max_abs_diff(expected, logits(llama)) > 1e-3, "the adapter does not change the model: test proves nothing"
    _, original, written = _round_trip(peft_model, tmp_path)

    reloaded = load_peft(llama, written)
    assert max_abs_diff(logits(reloaded), expected) <= LOGITS_TOLERANCE

    # Nothing dropped or altered on the way: every tensor PEFT saved is in adapterkit's file, bit for bit.
    theirs, ours = load_file(original / WEIGHTS_NAME), load_file(written / WEIGHTS_NAME)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    # The config is written as PEFT writes it, with set-valued fields (target_modules) in sorted order.
    import json

    from adapterkit.adapter.config import canonical_config

    theirs_config = json.loads((original / CONFIG_NAME).read_bytes())
    assert json.loads((written / CONFIG_NAME).read_bytes()) == canonical_config(theirs_config)
    assert (written / CONFIG_NAME).read_bytes() == config_bytes(canonical_config(theirs_config))


def test_gpt2_fan_in_fan_out_round_trip(tmp_path):
    base = tiny_gpt2()
    peft_model = make_lora(base, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    _, _, written = _round_trip(peft_model, tmp_path)
    assert max_abs_diff(logits(load_peft(base, written)), logits(peft_model)) <= LOGITS_TOLERANCE


def test_conv_round_trip_on_a_custom_model(tmp_path):
    base = tiny_conv_net()
    peft_model = make_lora(base, r=4, lora_alpha=6, target_modules=["conv", "pointwise", "temporal", "head"])
    _, _, written = _round_trip(peft_model, tmp_path)
    with torch.no_grad():
        expected = peft_model(conv_input())
        assert max_abs_diff(expected, base(conv_input())) > 1e-4
        assert max_abs_diff(load_peft(base, written)(conv_input()), expected) <= LOGITS_TOLERANCE


def test_dora_round_trip_keeps_magnitudes(llama, tmp_path):
    """DoRA loads, its magnitude vectors ride along untouched and PEFT gets the same model back."""
    peft_model = make_lora(llama, **LLAMA_LORA_CASES["dora"])
    adapter, original, written = _round_trip(peft_model, tmp_path)
    theirs = load_file(original / WEIGHTS_NAME)
    magnitudes = {key for key in theirs if key.endswith(".lora_magnitude_vector")}
    assert magnitudes and magnitudes <= set(adapter.extra_tensors)
    assert all(torch.equal(adapter.extra_tensors[key], theirs[key]) for key in magnitudes)
    assert max_abs_diff(logits(load_peft(llama, written)), logits(peft_model)) <= LOGITS_TOLERANCE


@pytest.mark.parametrize("case", ["dora", "lora-bias", "modules-to-save"])
def test_store_export_keeps_what_the_adapter_carries(case, llama, tmp_path):
    """Added to a store and exported (Store.export, and `adapterkit export`), the adapter is the same model in PEFT:
    DoRA magnitude vectors, lora_B biases and modules_to_save copies included."""
    from click.testing import CliRunner

    from adapterkit import Store
    from adapterkit.cli import cli

    peft_model = make_lora(llama, **LLAMA_LORA_CASES[case])
    peft_model.save_pretrained(tmp_path / "peft")
    store = Store(tmp_path / "store")
    store.add(tmp_path / "peft", "x/a")
    out = store.export("x/a", tmp_path / "exported").path
    result = CliRunner().invoke(cli, ["--store", str(store.root), "export", "x/a", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    theirs = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    extras = [key for key in theirs if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert extras  # the case carries something beyond the factors
    expected = logits(peft_model)
    assert max_abs_diff(expected, logits(llama)) > 1e-3
    for folder in (out, tmp_path / "cli"):
        ours = load_file(folder / WEIGHTS_NAME)
        assert all(torch.equal(ours[key], theirs[key]) for key in extras)
        assert max_abs_diff(logits(load_peft(llama, folder)), expected) <= LOGITS_TOLERANCE


def test_modules_to_save_round_trip_unchanged(llama, tmp_path):
    peft_model = make_lora(llama, **LLAMA_LORA_CASES["modules-to-save"])
    adapter, original, written = _round_trip(peft_model, tmp_path)
    assert "modules_to_save" in adapter.carried
    head = "base_model.model.lm_head.weight"
    assert set(adapter.extra_tensors) == {head}
    assert torch.equal(load_file(written / WEIGHTS_NAME)[head], load_file(original / WEIGHTS_NAME)[head])
    assert not torch.equal(load_file(written / WEIGHTS_NAME)[head], llama.lm_head.weight)  # really trained
    assert max_abs_diff(logits(load_peft(llama, written)), logits(peft_model)) <= LOGITS_TOLERANCE


def test_bin_adapter_reads_like_safetensors(llama, tmp_path):
    """A legacy adapter_model.bin loads through the restricted unpickler and is written back as safetensors."""
    peft_model = make_lora(llama, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"])
    adapter, original, written = _round_trip(peft_model, tmp_path, safe_serialization=False)
    assert (original / BIN_NAME).is_file() and not (original / WEIGHTS_NAME).exists()
    assert open_folder(original).is_bin
    assert (written / WEIGHTS_NAME).is_file()
    assert max_abs_diff(logits(load_peft(llama, written)), logits(peft_model)) <= LOGITS_TOLERANCE
    from_safetensors = read_adapter(_round_trip(peft_model, tmp_path / "st")[1])
    assert set(from_safetensors.state_dict()) == set(adapter.state_dict())
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in from_safetensors.state_dict().items())


# --- canonical bytes -------------------------------------------------------------------------------------------


def test_same_adapter_written_twice_gives_identical_bytes(llama, tmp_path):
    adapter, original, first = _round_trip(make_lora(llama, **LLAMA_LORA_CASES["patterns-list-target"]), tmp_path)
    second = write_adapter(read_adapter(first), tmp_path / "second")
    third = write_adapter(copy.deepcopy(adapter), tmp_path / "third")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (first / name).read_bytes() == (second / name).read_bytes() == (third / name).read_bytes()
    # What write_adapter writes is the canonical form of PEFT's own file, which PEFT laid out its own way.
    peft_file = original / WEIGHTS_NAME
    canonical = b"".join(iter_canonical_bytes(peft_file, read_header(peft_file)))
    assert hashlib.sha256(canonical).digest() == hashlib.sha256((first / WEIGHTS_NAME).read_bytes()).digest()


def test_tensors_to_bytes_is_order_and_layout_independent():
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    a = {"b": base.T, "a": torch.arange(5, dtype=torch.int64), "c": torch.tensor(True)}
    b = {"c": torch.tensor(True), "a": torch.arange(5, dtype=torch.int64), "b": base.T.contiguous()}
    assert tensors_to_bytes(a) == tensors_to_bytes(b)
    from safetensors.torch import load

    back = load(tensors_to_bytes(a))
    assert all(torch.equal(back[key], value) for key, value in a.items())


def test_config_bytes_match_peft(tmp_path):
    """Same bytes as PEFT's save_pretrained, whatever the key order; sets (PEFT's target_modules) sorted."""
    import json

    from peft import LoraConfig

    peft_config = LoraConfig(r=4, target_modules=["v_proj", "q_proj", "k_proj"], rank_pattern={"z": 1, "a": 2})
    peft_config.save_pretrained(tmp_path)
    on_disk = (tmp_path / CONFIG_NAME).read_bytes()
    as_json = json.loads(on_disk)
    as_json["target_modules"] = sorted(as_json["target_modules"])  # PEFT writes the set in hash order
    assert config_bytes(as_json) == json.dumps(as_json, indent=2, sort_keys=True).encode()
    assert config_bytes(dict(reversed(list(as_json.items())))) == config_bytes(as_json)
    in_memory = peft_config.to_dict()
    assert isinstance(in_memory["target_modules"], set)
    assert json.loads(config_bytes(in_memory))["target_modules"] == ["k_proj", "q_proj", "v_proj"]


# --- folders adapterkit must refuse ---------------------------------------------------------------------------


def _assert_names_file(info, path) -> None:
    message = str(info.value)
    assert_one_line(message)
    assert str(path) in message, message


@pytest.fixture
def lora_folder(llama, tmp_path):
    make_lora(llama).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def test_folder_refusals_name_the_path(lora_folder, tmp_path):
    with pytest.raises(AdapterFormatError) as info:
        open_folder(tmp_path / "missing")
    _assert_names_file(info, tmp_path / "missing")

    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match=CONFIG_NAME) as info:
        open_folder(tmp_path / "empty")
    _assert_names_file(info, tmp_path / "empty")

    (lora_folder / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFormatError, match=WEIGHTS_NAME) as info:
        read_adapter(lora_folder)
    _assert_names_file(info, lora_folder)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "Git LFS pointer"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, r"not valid JSON \(nested too deeply\)"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"base_model": "lerobot/smolvla_base"}', "'peft_type'"),
        (b'{"peft_type": "LORA", "r": -1}', "'r'"),
    ],
)
def test_bad_configs_are_refused(content, words, lora_folder):
    config = lora_folder / CONFIG_NAME
    config.write_bytes(content)
    with pytest.raises(AdapterFormatError, match=words) as info:
        read_adapter(lora_folder)
    _assert_names_file(info, config)


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: __import__("peft").IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        lambda: __import__("peft").LoHaConfig(r=4, target_modules=["q_proj"]),
        lambda: __import__("peft").LoKrConfig(r=4, target_modules=["q_proj"]),
        lambda: __import__("peft").AdaLoraConfig(target_modules=["q_proj"], total_step=10),
        lambda: __import__("peft").PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=["IA3", "LOHA", "LOKR", "ADALORA", "PREFIX_TUNING"],
)
def test_non_lora_adapters_made_by_peft_are_unsupported(make_config, llama, tmp_path):
    from peft import get_peft_model

    get_peft_model(copy.deepcopy(llama), make_config()).save_pretrained(tmp_path / "adapter")
    for call in (open_folder, read_adapter):
        with pytest.raises(UnsupportedAdapterError, match="'peft_type'") as info:
            call(tmp_path / "adapter")
        _assert_names_file(info, tmp_path / "adapter" / CONFIG_NAME)


def test_rank_mismatch_between_config_and_weights(lora_folder):
    """A config whose r disagrees with the factors would give PEFT a shape error: refuse it up front."""
    import json

    config = json.loads((lora_folder / CONFIG_NAME).read_text())
    config["r"] = 4
    (lora_folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="r=4") as info:
        read_adapter(lora_folder)
    _assert_names_file(info, lora_folder / WEIGHTS_NAME)


def test_safetensors_the_library_cannot_load_is_refused(lora_folder):
    """A header adapterkit accepts but safetensors.torch cannot map must be refused as adapterkit's own error,
    naming the file, not escape as the library's exception type (here a KeyError).

    F8_E8M0 is a safetensors dtype that the pinned safetensors (constraints.txt) does not map to torch, so
    the refusal is what must happen. A safetensors that maps it would load the tensor as an extra tensor
    instead; then this test must move to a dtype it still cannot map."""
    from safetensors.torch import load_file as load

    tensors = {key: (value, "F32") for key, value in load(lora_folder / WEIGHTS_NAME).items()}
    raw = {key: ("F32", tuple(t.shape), t.numpy().tobytes()) for key, (t, _) in tensors.items()}
    raw["base_model.model.scale"] = ("F8_E8M0", (1,), b"\x7f")
    from adapterkit.files.safetensors import serialize

    (lora_folder / WEIGHTS_NAME).write_bytes(serialize(raw))
    with pytest.raises(AdapterFormatError, match="safetensors could not load it") as caught:
        read_adapter(lora_folder)
    assert_one_line(str(caught.value))
    assert str(lora_folder / WEIGHTS_NAME) in str(caught.value) and "F8_E8M0" in str(caught.value)


# --- .bin files: never unpickled ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a harmless stand-in for arbitrary code execution."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bin_folder(lora_folder, content: bytes):
    (lora_folder / WEIGHTS_NAME).unlink()
    (lora_folder / BIN_NAME).write_bytes(content)
    return lora_folder / BIN_NAME


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle-2", "pickle-4", "torch.save"])
def test_code_in_a_bin_is_never_executed(writer, lora_folder, tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    if writer.startswith("pickle"):
        protocol = int(writer[-1])
        payload = pickle.dumps({"base_model.model.x.lora_A.weight": _Payload(marker)}, protocol=protocol)
        pickle.loads(pickle.dumps(_Payload(control), protocol=protocol))  # live: a real unpickler runs it
    else:
        torch.save({"base_model.model.x.lora_A.weight": _Payload(marker)}, tmp_path / "evil.pt")
        payload = (tmp_path / "evil.pt").read_bytes()
        torch.save(_Payload(control), tmp_path / "control.pt")
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists(), "the payload does not work, so this test could not fail"

    path = _bin_folder(lora_folder, payload)
    with pytest.raises(AdapterFormatError, match="refused for safety") as info:
        read_adapter(lora_folder)
    _assert_names_file(info, path)
    assert not marker.exists(), "adapterkit executed code from a pickle"


def _torch_bytes(obj, tmp_path, *, legacy: bool = False) -> bytes:
    torch.save(obj, tmp_path / "obj.pt", _use_new_zipfile_serialization=not legacy)
    return (tmp_path / "obj.pt").read_bytes()


def _zip_with(tmp_path, name_part: str, content: bytes | None) -> bytes:
    """A torch zip checkpoint whose member containing ``name_part`` is replaced (None: removed)."""
    (tmp_path / "good.zip").write_bytes(_torch_bytes({"base_model.model.x.lora_A.weight": torch.ones(4, 4)}, tmp_path))
    with zipfile.ZipFile(tmp_path / "good.zip") as src, zipfile.ZipFile(tmp_path / "bad.zip", "w") as dst:
        for item in src.infolist():
            if name_part not in item.filename:
                dst.writestr(item, src.read(item))
            elif content is not None:
                dst.writestr(item, content)
    return (tmp_path / "bad.zip").read_bytes()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: b"", "empty file"),
        (lambda tmp: b"\r\n", "not a torch checkpoint"),
        (lambda tmp: b"garbage that is not a checkpoint", "not a torch checkpoint"),
        (lambda tmp: _torch_bytes([torch.ones(2)], tmp), "not a mapping of names to tensors"),
        (lambda tmp: _torch_bytes({"a": 1}, tmp), "not a mapping of names to tensors"),
        (lambda tmp: _torch_bytes({1: torch.ones(2)}, tmp), "not a mapping of names to tensors"),
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp)[:300], "not a readable torch file"),
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp)[:-30], "not a readable torch file"),
        (lambda tmp: pickle.dumps({"a": [1, 2]}, protocol=2), "not a readable torch file"),
        # torch raises IndexError, EOFError, ValueError, RuntimeError... on these: all must become one error type
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp, legacy=True)[:3], "not a readable torch file"),
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp, legacy=True)[:40], "not a readable torch file"),
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp, legacy=True)[:300], "not a readable torch file"),
        (lambda tmp: _torch_bytes({"a": torch.ones(64)}, tmp, legacy=True)[:-10], "not a readable torch file"),
        (lambda tmp: _zip_with(tmp, "/data/", None), "not a readable torch file"),
        (lambda tmp: _zip_with(tmp, "/data/", b"\x00" * 8), "not a readable torch file"),
        (lambda tmp: _zip_with(tmp, "byteorder", b"weird"), "not a readable torch file"),
        (lambda tmp: _zip_with(tmp, "data.pkl", b"\x80\x02}q\x00"), "not a readable torch file"),
    ],
    ids=[
        "0-byte",
        "2-byte",
        "garbage",
        "list",
        "int-value",
        "int-key",
        "truncated",
        "cut-directory",
        "plain-pickle",
        "legacy-cut-3",
        "legacy-cut-40",
        "legacy-cut-300",
        "legacy-cut-end",
        "zip-missing-record",
        "zip-short-record",
        "zip-bad-byteorder",
        "zip-cut-pickle",
    ],
)
def test_malformed_bins_are_refused(make, words, lora_folder, tmp_path):
    path = _bin_folder(lora_folder, make(tmp_path))
    with pytest.raises(AdapterFormatError, match=words) as info:
        read_adapter(lora_folder)
    _assert_names_file(info, path)
    assert len(str(info.value)) < 400


def test_header_only_safetensors_folder(lora_folder):
    """A weights file with no tensors at all is an adapter with no LoRA weights: refused by name."""
    (lora_folder / WEIGHTS_NAME).write_bytes(header_bytes({"__metadata__": {"format": "pt"}}))
    with pytest.raises(AdapterFormatError, match="no LoRA weights") as info:
        read_adapter(lora_folder)
    _assert_names_file(info, lora_folder / WEIGHTS_NAME)


def test_folder_is_read_without_torch_for_description(lora_folder, tmp_path):
    folder = open_folder(lora_folder)
    specs, extras, prefix = folder.describe()
    assert [s.name for s in specs] == sorted(read_adapter(lora_folder).modules)
    assert extras == [] and prefix == "base_model.model."
    shutil.copytree(lora_folder, tmp_path / "copy")
    (tmp_path / "copy" / "README.md").write_text("card")
    assert open_folder(tmp_path / "copy").readme == tmp_path / "copy" / "README.md"


def test_load_bin_reads_both_torch_formats(tmp_path):
    tensors = {"base_model.model.x.lora_A.weight": torch.randn(2, 3), "n": torch.arange(3)}
    for legacy in (False, True):
        path = tmp_path / f"legacy-{legacy}.bin"
        path.write_bytes(_torch_bytes(tensors, tmp_path, legacy=legacy))
        loaded = load_bin(path)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_target_module_order_does_not_change_the_digest(tmp_path: Path) -> None:
    """PEFT saves target_modules in set order, which varies between runs: one adapter must keep one digest."""
    import json

    from adapterkit import Store

    base = tiny_llama()
    first = save_lora(base, tmp_path / "first", seed=1, target_modules=["q_proj", "v_proj", "k_proj"])
    second = tmp_path / "second"
    shutil.copytree(first, second)
    config = json.loads((first / "adapter_config.json").read_text())
    config["target_modules"] = [*sorted(config["target_modules"], reverse=True), "q_proj"]
    (second / "adapter_config.json").write_text(json.dumps(config, indent=2))
    store = Store(tmp_path / "store")
    assert store.add(first, "a").digest == store.add(second, "b").digest
    assert read_adapter(second).config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
