"""Tiny real models and real PEFT adapters, built in-process; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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


def save_base(model: Any, path: Path, max_shard_size: str | int | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_lora(base: Any, seed: int = 1, **lora_kwargs: Any) -> Any:
    """A PEFT LoRA model on ``base`` with random (non-zero) A and B, so its delta is non-trivial."""
    import copy

    from peft import LoraConfig, get_peft_model

    params: dict[str, Any] = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    params.update(lora_kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**params))
    return model.eval()


def save_lora(base: Any, path: Path, seed: int = 1, **lora_kwargs: Any) -> Path:
    make_lora(base, seed=seed, **lora_kwargs).save_pretrained(path)
    return path


def logits(model: Any, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits
