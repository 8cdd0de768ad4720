"""model_config_from_gguf: the real Gemma 3 270M and hand-made metadata for every rule."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFError, GGUFFile, UnsupportedModelError

DROP = object()


def write_model(
    path: Path,
    arch: str = "gemma3",
    n_embd: int = 64,
    vocab: int = 40,
    tokens: int | None = None,
    output: bool = False,
    **overrides,
) -> Path:
    """A metadata-only model: the keys llama.cpp reads, plus token_embd (and maybe output)."""
    w = gguf.GGUFWriter(path, arch)
    kv = {
        "embedding_length": n_embd,
        "block_count": 12,
        "feed_forward_length": 128,
        "context_length": 4096,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 32,
        "attention.value_length": 32,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 1e6,
    }
    if arch == "gemma3":
        kv["attention.sliding_window"] = 512
    kv.update(overrides)
    for key, value in kv.items():
        full = f"{arch}.{key}"
        if value is DROP:
            continue
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, list):
            w.add_array(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    w.add_name("test model")
    if tokens is not None:
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(tokens)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, n_embd), dtype=np.float32))
    if output:
        w.add_tensor("output.weight", np.zeros((vocab, n_embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def config(tmp_path: Path, **kw):
    with GGUFFile(write_model(tmp_path / "m.gguf", **kw)) as g:
        return model_config_from_gguf(g)


def test_real_gemma3_270m(real_model_path):
    with GGUFFile(real_model_path) as g:
        c = model_config_from_gguf(g)
    assert c.architecture == "gemma3" and c.name == "Gemma 3 270m"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        262144,
        640,
        2048,
        18,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_dim) == (4, 1, 256, 256)
    assert c.rms_norm_eps == pytest.approx(1e-6) and c.max_position_embeddings == 32768
    assert c.rope_theta == 1e6 and c.rope_theta_local == 10000.0 and c.rope_scaling_factor == 1.0
    assert c.sliding_window == 512
    assert [il for il in range(18) if not c.is_sliding(il)] == [5, 11, 17]
    assert c.attention_scale == 1 / 16 and c.final_logit_softcapping == 0.0
    assert c.embedding_scale == pytest.approx(math.sqrt(640), rel=1e-7)
    assert c.embedding_scale == float(np.sqrt(np.float32(640)))
    assert c.tie_word_embeddings is True


def test_gemma3_defaults(tmp_path):
    c = config(tmp_path, tokens=40)
    assert c.vocab_size == 40 and c.num_kv_heads == 2 and c.head_dim == 32
    assert c.sliding_window_layers == tuple(il % 6 < 5 for il in range(12))
    assert c.rope_theta_local == 10000.0 and c.attention_scale == float(
        np.float32(1 / math.sqrt(32))
    )
    assert c.tie_word_embeddings and c.embedding_scale == float(np.sqrt(np.float32(64)))


def test_gemma3_pattern_period_and_bool_array(tmp_path):
    c = config(tmp_path, **{"attention.sliding_window_pattern": 3})
    assert [il for il in range(12) if not c.is_sliding(il)] == [2, 5, 8, 11]
    c = config(tmp_path, **{"attention.sliding_window_pattern": 0})
    assert all(c.sliding_window_layers)
    pattern = [True, False] * 6
    c = config(tmp_path, **{"attention.sliding_window_pattern": pattern})
    assert c.sliding_window_layers == tuple(pattern)
    with pytest.raises(GGUFError, match="has 3 entries for 12 layers"):
        config(tmp_path, **{"attention.sliding_window_pattern": [True, False, True]})


def test_gemma3_no_sliding_window(tmp_path):
    c = config(tmp_path, **{"attention.sliding_window": 0})
    assert c.sliding_window == 0 and c.sliding_window_layers == ()
    assert not any(c.is_sliding(il) for il in range(12))


def test_gemma3_rope_softcap_output(tmp_path):
    c = config(
        tmp_path,
        output=True,
        **{
            "rope.freq_base_swa": 20000.0,
            "rope.scaling.type": "linear",
            "rope.scaling.factor": 8.0,
            "final_logit_softcapping": 30.0,
        },
    )
    assert c.rope_theta_local == 20000.0 and c.rope_scaling_factor == 8.0
    assert c.final_logit_softcapping == 30.0 and c.tie_word_embeddings is False
    c = config(tmp_path, **{"rope.scaling.type": "none", "rope.scaling.factor": 8.0})
    assert c.rope_scaling_factor == 1.0
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        config(tmp_path, **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})


def test_gemma3_27b_attention_scale(tmp_path):
    # 62 layers: q scaled by 1/sqrt(n_embd / n_head) = 1/sqrt(64 / 4), not 1/sqrt(head_dim = 32)
    c = config(tmp_path, block_count=62)
    assert c.attention_scale == 0.25


def test_llama_style_architectures(tmp_path):
    for arch in ("llama", "qwen2", "qwen3"):
        c = config(
            tmp_path,
            arch=arch,
            **{
                "rope.freq_base": 500000.0,
                "attention.key_length": 16,
                "attention.value_length": 16,
            },
        )
        assert c.architecture == arch and c.sliding_window == 0 and c.sliding_window_layers == ()
        assert c.embedding_scale == 1.0 and c.final_logit_softcapping == 0.0
        assert c.rope_theta == c.rope_theta_local == 500000.0
        assert c.attention_scale == 0.25 and c.head_dim == 16
    c = config(
        tmp_path, arch="llama", **{"attention.key_length": DROP, "attention.value_length": DROP}
    )
    assert c.head_dim == 16  # n_embd / n_head
    with pytest.raises(GGUFError, match="rope.dimension_count 8 != 32"):
        config(tmp_path, arch="llama", **{"rope.dimension_count": 8})


def test_per_layer_arrays(tmp_path):
    c = config(tmp_path, **{"attention.head_count_kv": [2] * 12, "feed_forward_length": [96] * 12})
    assert c.num_kv_heads == 2 and c.intermediate_size == 96
    with pytest.raises(UnsupportedModelError, match="feed_forward_length differs between layers"):
        config(tmp_path, **{"feed_forward_length": [96] * 11 + [64]})


def test_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'") as e:
        config(tmp_path, arch="mamba")
    assert "m.gguf" in str(e.value)
    with pytest.raises(GGUFError, match="missing required metadata key 'gemma3.context_length'"):
        config(tmp_path, context_length=DROP)
    with pytest.raises(GGUFError, match="gemma3.block_count must be an integer, got 'x'"):
        config(tmp_path, block_count="x")
    with pytest.raises(UnsupportedModelError, match="key_length 32 != value_length 16"):
        config(tmp_path, **{"attention.value_length": 16})
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens has 39 tokens"):
        config(tmp_path, tokens=39)
    with pytest.raises(GGUFError, match="head_count_kv=3"):
        config(tmp_path, **{"attention.head_count_kv": 3})
