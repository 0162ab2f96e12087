"""A real llama.cpp in the tests: tiny Hugging Face models written as GGUF, run through llama.cpp's C API.

The binding is ``llama-cpp-python`` (built from its source distribution, which vendors llama.cpp;
its ``llama_cpp.llama_cpp`` module is a ctypes mirror of the C API): a test loads a base model with
``llama_model_load_from_file``, applies an adapter with ``llama_adapter_lora_init`` and
``llama_set_adapters_lora``, decodes a token sequence asking for every position's logits, and
compares them with the logits PEFT gives for the same base and adapter.

The base GGUF is written here with the ``gguf`` package from the model's own weights, as llama.cpp's
``convert_hf_to_gguf.py`` would write it (the same tensor names, and for the Llama family the same
q/k row permutation), with a small SentencePiece-style vocabulary of its own (``<unk>``, ``<s>``,
``</s>``, the 256 byte tokens, then filler pieces): nothing is downloaded. Key and value caches are
kept in float32 and flash attention is off, so llama.cpp's float32 arithmetic is what is compared.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Hugging Face architecture -> (llama.cpp architecture, q/k rows permuted), as llama.cpp's converter does.
ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}


def tiny_causal_lm(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny model of ``arch`` (hidden 64, 2 layers, 4 query and 2 key/value heads, vocab 288)."""
    import transformers

    params: dict[str, Any] = dict(
        vocab_size=288,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if arch == "Qwen3ForCausalLM":
        params["head_dim"] = 16
    params.update(overrides)
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config_class(**params)).eval()
    with torch.no_grad():  # norms at 1 and zero biases would hide a mis-mapped tensor: perturb them
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581piece{i}" for i in range(size - len(tokens))]
    types += [1] * (size - len(types))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(size - 259)]
    return tokens[:size], scores[:size], types[:size]


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_base_gguf(model: Any, path: Path) -> Path:
    """The base model as a float32 GGUF that llama.cpp loads (tokenizer included)."""
    import gguf

    config = model.config
    hf_arch = config.architectures[0] if config.architectures else type(model).__name__
    arch, permute = ARCHS[hf_arch]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(0)
    tokens, scores, types = _vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for a missing output layer
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {name}"
        data = tensor.detach().to(torch.float32)
        if permute and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            data = _permute(data, n_head if ".q_proj." in name else n_kv)
        writer.add_tensor(gguf_name, data.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class LlamaCpp:
    """One llama.cpp model and context; ``logits(ids, adapter=...)`` gives every position's logits."""

    def __init__(self, model_path: Path, n_ctx: int = 64) -> None:
        import ctypes

        from llama_cpp import llama_cpp as lib

        self.ctypes, self.lib = ctypes, lib
        self.log: list[str] = []
        self._log_cb = lib.llama_log_callback(
            lambda _level, text, _data: self.log.append(text.decode("utf-8", "replace"))
        )
        lib.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}: {''.join(self.log[-5:])}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_ctx
        ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = 2
        ctx_params.n_threads_batch = 2
        ctx_params.type_k = 0  # GGML_TYPE_F32: no float16 rounding of the cache
        ctx_params.type_v = 0
        ctx_params.flash_attn_type = 0  # disabled
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context: {''.join(self.log[-5:])}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.adapters: dict[Path, Any] = {}

    def load_adapter(self, path: Path) -> Any:
        """``llama_adapter_lora_init``; RuntimeError with llama.cpp's own log lines when it refuses."""
        if path not in self.adapters:
            self.log.clear()
            adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp refused {path}: {''.join(self.log[-6:])}")
            self.adapters[path] = adapter
        return self.adapters[path]

    def adapter_meta(self, path: Path, key: str) -> str | None:
        buf = self.ctypes.create_string_buffer(256)
        n = self.lib.llama_adapter_meta_val_str(self.load_adapter(path), key.encode(), buf, 256)
        return None if n < 0 else buf.value.decode()

    def logits(self, ids: Sequence[int], adapter: Path | None = None, scale: float = 1.0) -> np.ndarray:
        lib, ctypes = self.lib, self.ctypes
        if adapter is None:
            rc = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            handles = (lib.llama_adapter_lora_p_ctypes * 1)(self.load_adapter(adapter))
            scales = (ctypes.c_float * 1)(scale)
            rc = lib.llama_set_adapters_lora(self.ctx, handles, 1, scales)
        assert rc == 0, f"llama_set_adapters_lora returned {rc}"
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i] = int(token)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            rc = lib.llama_decode(self.ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}: {''.join(self.log[-3:])}"
        finally:
            lib.llama_batch_free(batch)
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for i in range(len(ids)):
            row = lib.llama_get_logits_ith(self.ctx, i)
            out[i] = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
        return out

    def close(self) -> None:
        for adapter in self.adapters.values():
            self.lib.llama_adapter_lora_free(adapter)
        self.adapters.clear()
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference over the largest magnitude of the reference."""
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max() / np.abs(want).max())
