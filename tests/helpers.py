"""Tiny real models and real PEFT adapters, built in-process; nothing is downloaded.

PEFT itself is the oracle in most tests: an adapter made here with ``get_peft_model`` is what a user
would bring, and ``PeftModel.from_pretrained`` is what must accept whatever adapterkit writes back.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

#: PEFT LoRA settings for the Llama round trips, by test id. The patterns cover the ways PEFT resolves a
#: module's rank and alpha: a bare suffix, a dotted regex, first match wins when several keys match (keys are
#: listed in sorted order because PEFT's save_pretrained sorts them, so the reloaded model resolves them in that
#: order), and rank_pattern together with rsLoRA.
LLAMA_LORA_CASES: dict[str, dict[str, Any]] = {
    "r8": dict(r=8, lora_alpha=16),
    "r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "r16-rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj", "down_proj"]),
    "patterns-list-target": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={
            r"layers\.\d+\.mlp\..*": 6,
            r"layers\.\d+\.self_attn\.q_proj": 4,
            r"model\.layers\.0\.self_attn\.q_proj": 12,  # never wins: the key above matches first
            r"model\.layers\.1\.self_attn\.v_proj": 12,
            "v_proj": 2,
        },
        alpha_pattern={r".*\.layers\.0\.self_attn\.(k|v)_proj": 40, "o_proj": 3},
    ),
    "patterns-rslora-regex-target": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=r".*\.(q_proj|v_proj|gate_proj)",
        rank_pattern={"gate_proj": 2, r"model\.layers\.1\..*": 4},
        alpha_pattern={r"model\.layers\.0\..*": 5.5},
    ),
    "regex-target": dict(r=16, lora_alpha=32, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|up_proj)"),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "modules-to-save": dict(r=8, lora_alpha=16, modules_to_save=["lm_head"]),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora-bias": dict(r=8, lora_alpha=16, lora_bias=True, target_modules=["q_proj", "v_proj"]),
}


def tiny_llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    params: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0) -> Any:
    """A tiny BERT sequence classifier (3 labels): PEFT's ``task_type="SEQ_CLS"`` adds its ``classifier`` to
    ``modules_to_save``, so the trained head travels in the adapter as a full copy."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


class TinyConvNet(nn.Module):
    """A custom (non-transformers) model: PEFT LoRA supports it through plain ``target_modules``.

    It has a 3x3 Conv2d (PEFT's general conv path), a 1x1 Conv2d (PEFT's separate matmul path), a
    Conv1d and a Linear, so one adapter covers every conv kind adapterkit reshapes deltas for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(8, 6, kernel_size=1)
        self.temporal = nn.Conv1d(6, 5, kernel_size=3, padding=1)
        self.head = nn.Linear(5 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.pointwise(x)  # (batch, 6, 8, 8)
        x = x.mean(dim=3)  # (batch, 6, 8)
        x = self.temporal(x)  # (batch, 5, 8)
        return self.head(x.flatten(1))


def tiny_conv_net(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def conv_input(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 3, 8, 8)


def save_base(model: Any, path: Path, max_shard_size: str | int | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_lora(base: Any, seed: int = 1, **lora_kwargs: Any) -> Any:
    """A PEFT LoRA model on a copy of ``base`` with random (non-zero) A and B, so its delta is non-trivial.

    Whatever else the config trains starts equal to the base (or at zero) and is perturbed too, so that an
    adapter which dropped it would give a different model: DoRA magnitudes, ``modules_to_save`` copies,
    ``lora_B``'s bias, the base biases ``bias="all"`` / ``"lora_only"`` trains, ``trainable_tokens_delta``.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    params: dict[str, Any] = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    params.update(lora_kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**params))
    biases = params.get("bias", "none") != "none"
    tokens = bool(params.get("trainable_token_indices"))
    # a task type can add modules_to_save of its own (SEQ_CLS: the classifier)
    copies = bool(params.get("modules_to_save")) or any("modules_to_save" in n for n, _ in model.named_parameters())
    if params.get("use_dora") or copies or params.get("lora_bias") or biases or tokens:
        # DoRA magnitudes start at the base weight norms, modules_to_save copies, trained biases and trainable
        # token rows start equal to the base and lora_B's bias at zero: perturb them all so that dropping or
        # mixing them up changes the output.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if (
                    "lora_magnitude_vector" in name
                    or "modules_to_save" in name
                    or "lora_B" in name
                    or (biases and param.requires_grad and name.endswith(".bias"))
                    or (tokens and "trainable_tokens_delta" in name)
                ):
                    param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_lora(base: Any, path: Path, seed: int = 1, **lora_kwargs: Any) -> Path:
    make_lora(base, seed=seed, **lora_kwargs).save_pretrained(path)
    return path


def load_peft(base: Any, path: Path) -> Any:
    """``PeftModel.from_pretrained`` on a fresh copy of ``base``: the reference loader."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def logits(model: Any, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """PEFT's LoRA layers by module path inside the base model (the names adapterkit uses)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.r
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, f"not a one-line message: {message!r}"


# --- raw safetensors files, laid out however a test needs ------------------------------------------------------


def raw_safetensors(
    tensors: Mapping[str, tuple[str, Sequence[int], bytes]],
    *,
    header_order: Iterable[str] | None = None,
    data_order: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    metadata_first: bool = True,
    pad: int = 0,
) -> bytes:
    """Safetensors bytes for ``name -> (dtype, shape, data)``, with the header entries in ``header_order``,
    the tensor data laid out in ``data_order`` and ``pad`` spaces after the JSON: all things a writer is free
    to choose, which canonical bytes must not depend on."""
    names = list(tensors)
    header_order = list(header_order) if header_order is not None else names
    data_order = list(data_order) if data_order is not None else names
    offsets: dict[str, list[int]] = {}
    position = 0
    for name in data_order:
        size = len(tensors[name][2])
        offsets[name] = [position, position + size]
        position += size
    entries = [
        (name, {"dtype": tensors[name][0], "shape": list(tensors[name][1]), "data_offsets": offsets[name]})
        for name in header_order
    ]
    meta = [("__metadata__", dict(metadata))] if metadata is not None else []
    doc = dict(meta + entries if metadata_first else entries + meta)
    raw = json.dumps(doc).encode("utf-8") + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors[name][2] for name in data_order)


def header_bytes(doc: Any) -> bytes:
    """A file whose header is ``doc`` (bytes are taken as the raw header) and no data."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


# --- the shared corpus of real adapter files --------------------------------------------------------------------


def corpus_dir() -> Path:
    """Where the real-world corpus lies: ``$ADAPTERKIT_CORPUS``, else ``<repo>/../shared/corpus``."""
    return Path(os.environ.get("ADAPTERKIT_CORPUS") or REPO.parent / "shared" / "corpus")


#: Three LoRA configs that differ in every way a blend must handle: rank, alpha, rsLoRA, rank and alpha
#: patterns (regex keys), list and regex targets, an embedding module. Tests blend and inspect these.
MIXED_LORA_SPECS: list[dict[str, Any]] = [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(
        r=4,
        lora_alpha=7,
        target_modules=r".*\.(q_proj|down_proj)",
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"down_proj": 3},
    ),
    dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "embed_tokens"]),
]
