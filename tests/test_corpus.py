"""Every real-world file in the shared corpus either loads or is refused with one clear line.

The corpus (see its README) holds configs and weights exactly as people committed them: old key sets,
regex targets, Git LFS pointers, truncated pickles, empty files, non-PEFT formats. It is read in place
(never copied into the repository: most files carry no licence) from ``$ADAPTERKIT_CORPUS``, by default
``<repo>/../shared/corpus``; without it these tests skip and say why.

The files adapterkit must refuse are listed below with the words their message must contain; every
other PEFT file must load. A new corpus file that should be refused belongs in those tables.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line, corpus_dir

from adapterkit.adapter.config import KEY_PREFIX, load_config_json, resolve_rank_alpha, validate_lora_config
from adapterkit.adapter.model import Adapter
from adapterkit.errors import AdapterFormatError, AdapterkitError, UnsupportedAdapterError
from adapterkit.files.safetensors import iter_canonical_bytes, read_header
from adapterkit.formats.peft import BIN_NAME, CONFIG_NAME, WEIGHTS_NAME, load_bin, read_adapter, write_adapter

CORPUS = corpus_dir()
_ABSENT = f"the adapter corpus is not at {CORPUS}; set ADAPTERKIT_CORPUS to the shared corpus folder to run these"

#: Config files adapterkit refuses, by a unique part of the file name: (error type, words in the message).
REFUSED_CONFIGS: dict[str, tuple[type[AdapterkitError], str]] = {
    "Inishpy__lerobot-libero": (AdapterFormatError, "'peft_type'"),
    "danabindra__postgres-deadlock-agent-lora": (AdapterFormatError, "'peft_type'"),
    "LrArctic__DPO-RMB-and-PS-AdaLoRA": (UnsupportedAdapterError, "'peft_type' is \"ADALORA\""),
    "davidjurgens__contextual-appropriateness": (UnsupportedAdapterError, "'peft_type' is \"PREFIX_TUNING\""),
    "experiments__adalora__": (UnsupportedAdapterError, "'peft_type' is \"ADALORA\""),
    "experiments__ia3__": (UnsupportedAdapterError, "'peft_type' is \"IA3\""),
    "experiments__loha__": (UnsupportedAdapterError, "'peft_type' is \"LOHA\""),
    "experiments__lokr__": (UnsupportedAdapterError, "'peft_type' is \"LOKR\""),
    "experiments__prefixtuning__": (UnsupportedAdapterError, "'peft_type' is \"PREFIX_TUNING\""),
    "experiments__prompt_tuning__": (UnsupportedAdapterError, "'peft_type' is \"PROMPT_TUNING\""),
    "rinkaSA__qlora-ner": (AdapterFormatError, "Git LFS pointer"),
}
#: PEFT weight files (with a companion config) adapterkit refuses.
REFUSED_ADAPTERS: dict[str, str] = {
    "Hastws__NVIDIA-Nemotron": "0 bytes, too short",  # an empty adapter_model.safetensors
    "Inishpy__lerobot-libero": "'peft_type'",  # its config is {"base_model": ...}
    "sherryxzhao__lora_alpaca": "not a readable torch file",  # a zip cut at 1.25 MiB
}
#: Safetensors files whose header is refused.
REFUSED_HEADERS: dict[str, str] = {
    "Hastws__NVIDIA-Nemotron": "too short",
    "leighwoods__public-loras__Much7835": "too short",  # two bytes, CR LF
}

#: Module paths to try against a regex ``target_modules`` (PEFT full-matches the regex against each path).
_REGEX_CANDIDATES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.language_model.layers.0.self_attn.q_proj",
    "model.language_model.layers.0.mlp.down_proj",
    "custom_text_proj",
    "transformer.h.0.attn.c_attn",
)


def _expected(table: dict, path: Path):
    matches = [value for key, value in table.items() if key in path.name]
    assert len(matches) <= 1, f"{path.name} matches several expectation entries"
    return matches[0] if matches else None


def _files(folder: str, suffixes: tuple[str, ...], companion_only: bool = False) -> list:
    root = CORPUS / folder
    if not root.is_dir():
        return [pytest.param(None, id="corpus-absent", marks=pytest.mark.skip(reason=_ABSENT))]
    paths = sorted(p for p in root.iterdir() if p.name.endswith(suffixes) and not p.name.endswith("SOURCES.tsv"))
    if companion_only:
        paths = [p for p in paths if _companion(p) is not None]
    return [pytest.param(p, id=p.name) for p in paths]


def _companion(weights: Path) -> Path | None:
    if "adapter_model" not in weights.name:
        return None
    config = weights.with_name(weights.name.rsplit("adapter_model", 1)[0] + CONFIG_NAME)
    return config if config.is_file() else None


def _assert_clear_refusal(exc: BaseException, path: Path) -> None:
    message = str(exc)
    assert_one_line(message)
    assert str(path) in message or re.search(r"field '[^']+'", message), f"names neither file nor field: {message}"
    assert len(message) < 400, message


# --- configs: load into an adapter with synthetic weights, or be refused ---------------------------------------


def _module_paths(config: dict) -> list[str]:
    """Module paths a base model could have for this config's ``target_modules``."""
    targets = config.get("target_modules")
    if targets is None:  # PEFT falls back to its per-architecture defaults (q_proj/v_proj for Llama)
        return ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    if targets == "all-linear":
        return ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    if isinstance(targets, str):
        paths = sorted(p for p in _REGEX_CANDIDATES if re.fullmatch(targets, p))
        assert paths, f"no candidate module path matches the regex {targets!r}: add one to _REGEX_CANDIDATES"
        return paths
    # Suffix names sit under some parent; fully qualified names (the 8 KB TING-lct list) are paths already.
    return sorted({t if "." in t else f"model.layers.0.block.{t}" for t in targets})


def _synthetic_tensors(config: dict) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Random LoRA factors shaped by the rank PEFT would resolve for each module, plus modules_to_save copies."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    paths = _module_paths(config)
    for path in paths:
        r, _ = resolve_rank_alpha(config, path)
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = torch.randn(r, 16, generator=generator)
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = torch.randn(24, r, generator=generator)
    extras = sorted({f"{KEY_PREFIX}{name}.weight" for name in config.get("modules_to_save") or []})
    for key in extras:
        tensors[key] = torch.randn(6, 16, generator=generator)
    return tensors, paths, extras


@pytest.mark.parametrize("path", _files("configs", (".json",)))
def test_config_loads_or_is_refused(path, tmp_path):
    source = str(path)
    expected = _expected(REFUSED_CONFIGS, path)
    try:
        config = load_config_json(path.read_bytes(), source)
        validate_lora_config(config, source)
        tensors, paths, extras = _synthetic_tensors(config)
        adapter = Adapter.from_state_dict(config, tensors, source)
    except AdapterkitError as exc:  # anything else escapes and fails the test
        _assert_clear_refusal(exc, path)
        assert expected is not None, f"refused, but should load: {exc}"
        error_type, words = expected
        assert isinstance(exc, error_type), f"{type(exc).__name__}: {exc}"
        assert words in str(exc), str(exc)
        return
    assert expected is None, f"loaded, but should be refused with {expected}"

    assert sorted(adapter.modules) == paths
    for name, module in adapter.modules.items():
        r, alpha = resolve_rank_alpha(config, name)
        assert (module.spec.r, module.spec.alpha) == (r, alpha)
        assert module.spec.kind == "linear"
    assert sorted(adapter.extra_tensors) == extras
    assert ("modules_to_save" in adapter.carried) == bool(config.get("modules_to_save"))

    # It survives the PEFT folder round trip unchanged, whatever odd keys the config carries.
    read_back = read_adapter(write_adapter(adapter, tmp_path / "out"))
    assert read_back.config == config
    assert read_back.state_dict().keys() == adapter.state_dict().keys()
    assert all(torch.equal(read_back.state_dict()[k], v) for k, v in adapter.state_dict().items())


def test_regex_target_candidates_follow_peft():
    """The candidate paths are matched the way PEFT matches a string target_modules (a full match)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|down_proj)")
    chosen = _module_paths({"target_modules": config.target_modules})
    assert chosen == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]  # sorted
    for candidate in _REGEX_CANDIDATES:
        assert bool(check_target_module_exists(config, candidate)) == (candidate in chosen), candidate


# --- weights with a companion config: read_adapter, or a clear refusal -----------------------------------------


@pytest.mark.parametrize("weights", _files("weights", (".safetensors", ".bin"), companion_only=True))
def test_adapter_folder_loads_or_is_refused(weights, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copyfile(_companion(weights), folder / CONFIG_NAME)
    target = folder / (WEIGHTS_NAME if weights.suffix == ".safetensors" else BIN_NAME)
    shutil.copyfile(weights, target)
    expected = _expected(REFUSED_ADAPTERS, weights)
    try:
        adapter = read_adapter(folder)
    except AdapterkitError as exc:  # anything else escapes and fails the test
        _assert_clear_refusal(exc, target if str(target) in str(exc) else folder / CONFIG_NAME)
        assert expected is not None, f"refused, but should load: {exc}"
        assert expected in str(exc), str(exc)
        return
    assert expected is None, f"loaded, but should be refused ({expected})"

    # Nothing dropped or changed: the adapter holds exactly the file's tensors.
    if target.suffix == ".bin":
        original = torch.load(target, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        original = load_file(target)
    assert adapter.state_dict().keys() == original.keys()
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in original.items())
    assert adapter.modules

    written = write_adapter(adapter, tmp_path / "out")
    again = read_adapter(written)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in original.items()}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in original.items())
    assert again.config == adapter.config


def test_known_corpus_adapters_are_understood():
    """Spot checks of what the README says these real adapters are."""
    weights = CORPUS / "weights"
    if not weights.is_dir():
        pytest.skip(_ABSENT)

    from safetensors.torch import load_file

    def load(stem: str, suffix: str = ".safetensors") -> Adapter:
        path = next(weights.glob(f"{stem}*adapter_model{suffix}"))
        config = load_config_json(_companion(path).read_bytes(), str(path))
        tensors = load_bin(path) if suffix == ".bin" else load_file(path)
        return Adapter.from_state_dict(config, tensors, str(path))

    gpt2 = load("abrhaleyarefaine1997")
    assert all(m.spec.fan_in_fan_out for m in gpt2.modules.values())
    some = gpt2.modules[next(iter(gpt2.modules))]
    assert some.delta().shape == some.spec.base_shape  # (in, out), Conv1D's layout
    r1 = load("BK7195")
    assert {(m.spec.r, m.spec.dtype) for m in r1.modules.values()} == {(1, "F16")}
    conv = load("huggingface__peft__tests__regression__lora_conv2d", ".bin")
    (module,) = conv.modules.values()
    assert (module.spec.kind, module.spec.kernel, module.delta().shape) == ("conv2d", (3, 3), (10, 5, 3, 3))
    mlp = load("huggingface__peft__tests__regression__lora_mlp_modules_to_save", ".bin")
    assert sorted(mlp.extra_tensors) == ["base_model.model.lin1.bias", "base_model.model.lin1.weight"]
    bert = load("Hareshjethani")
    assert "base_model.model.classifier.weight" in bert.extra_tensors


# --- every safetensors file: its header parses (and canonicalises losslessly), or is refused --------------------


@pytest.mark.parametrize("path", _files("weights", (".safetensors",)))
def test_safetensors_header_and_canonical_bytes(path):
    expected = _expected(REFUSED_HEADERS, path)
    try:
        header = read_header(path)
    except AdapterkitError as exc:
        _assert_clear_refusal(exc, path)
        assert isinstance(exc, AdapterFormatError)
        assert expected is not None, f"refused, but should parse: {exc}"
        assert expected in str(exc)
        return
    assert expected is None, f"parsed, but should be refused ({expected})"
    from safetensors.torch import load, load_file

    canonical = b"".join(iter_canonical_bytes(path, header))
    original, back = load_file(path), load(canonical)
    assert back.keys() == original.keys() == header.tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
