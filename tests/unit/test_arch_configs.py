"""Each architecture's reader in gguf/model_config.py: the rules llama.cpp applies per family."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES, model_config_from_gguf
from llcuda.gguf.reader import GGUFError, GGUFFile, UnsupportedModelError


def arch_config(tmp_path: Path, arch: str, tensors=(), n_layers: int = 4, **overrides):
    """The ModelConfig of a metadata-only `arch` file with token_embd and the named 1-D tensors."""
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(path, arch)
    kv = {
        "embedding_length": 64,
        "block_count": n_layers,
        "feed_forward_length": 128,
        "context_length": 4096,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0,
        **overrides,
    }
    for key, value in kv.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    for name in tensors:
        w.add_tensor(name, np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as g:
        return model_config_from_gguf(g)


def test_supported_list():
    assert SUPPORTED_ARCHITECTURES == ("gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3")


def test_llama_norm_rope_silu_and_freq_factors(tmp_path):
    c = arch_config(tmp_path, "llama")
    assert (c.rope_neox, c.hidden_act, c.qk_norm, c.post_norms) == (False, "silu", False, False)
    assert c.rope_factors_for(131072) == "" and c.attention_scale == float(
        np.float32(1 / math.sqrt(16))
    )
    c = arch_config(tmp_path, "llama", tensors=["rope_freqs.weight"])
    assert c.rope_factors_for(2048) == c.rope_factors_for(131072) == "rope_freqs.weight"
    assert arch_config(tmp_path, "llama", **{"attention.scale": 0.5}).attention_scale == 0.5


def test_qwen_families(tmp_path):
    q2 = arch_config(tmp_path, "qwen2")
    assert (q2.rope_neox, q2.hidden_act, q2.qk_norm) == (True, "silu", False)
    q3 = arch_config(tmp_path, "qwen3", **{"attention.key_length": 32,
                                           "attention.value_length": 32})  # fmt: skip
    assert q3.qk_norm and q3.head_dim == 32 and q3.q_size == 128  # head_dim from the file
    assert q3.attention_scale == float(np.float32(1 / math.sqrt(32)))


def test_phi3_longrope(tmp_path):
    factors = ["rope_factors_long.weight", "rope_factors_short.weight"]
    c = arch_config(tmp_path, "phi3", tensors=factors, **{
        "rope.scaling.original_context_length": 4096, "rope.scaling.attn_factor": 1.2,
        "context_length": 131072})  # fmt: skip
    assert c.rope_factors_for(4096) == "rope_factors_short.weight"
    assert c.rope_factors_for(4097) == "rope_factors_long.weight"  # by context size, not position
    # cos and sin are scaled by attn_factor: the scores by its square, folded into q's scale
    assert c.attention_scale == pytest.approx(1.2**2 / math.sqrt(16), rel=1e-6)
    plain = arch_config(tmp_path, "phi3")
    assert plain.rope_factors_for(10**6) == "" and plain.attention_scale == 0.25
    assert (plain.rope_neox, plain.hidden_act) == (True, "silu")


def test_gemma2_defaults(tmp_path):
    c = arch_config(tmp_path, "gemma2", n_layers=6, **{"attention.key_length": 32,
                                                        "attention.value_length": 32})  # fmt: skip
    assert (c.hidden_act, c.post_norms, c.qk_norm, c.rope_neox) == ("gelu_tanh", True, False, True)
    assert c.attn_logit_softcapping == 50.0 and c.final_logit_softcapping == 30.0
    assert c.sliding_window == 4096 and c.sliding_window_layers == (True, False) * 3
    assert c.rope_theta_local == c.rope_theta and c.tie_word_embeddings
    assert c.embedding_scale == float(np.sqrt(np.float32(64)))
    assert c.attention_scale == float(np.float32(1 / math.sqrt(32)))
    c = arch_config(tmp_path, "gemma2", **{"attn_logit_softcapping": 20.0,
                                           "final_logit_softcapping": 10.0,
                                           "attention.sliding_window": 256})  # fmt: skip
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.sliding_window) == (
        20.0, 10.0, 256)  # fmt: skip
    head_32 = {"attention.key_length": 32, "attention.value_length": 32}
    big = arch_config(tmp_path, "gemma2", n_layers=46, **head_32)
    assert big.attention_scale == float(np.float32(1 / math.sqrt(64 // 4)))  # 27B: n_embd/n_head


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'.*gemma2, "
                       "gemma3, llama, phi3, qwen2, qwen3"):  # fmt: skip
        arch_config(tmp_path, "mamba")
    with pytest.raises(GGUFError, match="rope.dimension_count 8 != 16"):
        arch_config(tmp_path, "llama", **{"rope.dimension_count": 8})
