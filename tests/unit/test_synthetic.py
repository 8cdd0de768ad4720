"""Synthetic Gemma 3 GGUF writer: the Q4_K_M mix, twins of the real files, a usable tiny model."""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.synthetic import (
    GEMMA3_1B,
    GEMMA3_270M,
    REAL_FILE_SIZES,
    TINY,
    main,
    synthetic_file_size,
    synthetic_vocab,
    tensor_plan,
    use_more_bits,
    write_gemma3_gguf,
)
from llcuda.kernels.dequant_ref import dequantize_ref


def data_nbytes(plan) -> int:
    """Tensor data section size: each tensor padded to 32 bytes."""
    total = 0
    for _, ne, t in plan:
        block_elems, block_bytes = QUANT_SIZES[t]
        total += -(-(int(np.prod(ne)) // block_elems * block_bytes) // 32) * 32
    return total


def test_use_more_bits_layers():
    # first and last eighth, then every third layer between (llama-quant.cpp)
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
    assert [i for i in range(26) if use_more_bits(i, 26)] == [
        0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25,
    ]  # fmt: skip


def test_270m_plan_matches_real_file_tensor_for_tensor(real_model_path):
    plan = tensor_plan(**GEMMA3_270M)
    with GGUFFile(real_model_path) as g:
        real = [(t.name, t.shape, t.ggml_type) for t in g.tensors.values()]
        real_data = g.file_size - g.data_offset
    assert plan == real
    assert data_nbytes(plan) == real_data


def test_1b_twin_size_without_writing():
    plan = tensor_plan(**GEMMA3_1B)
    types = {t for _, _, t in plan}
    assert types == {GGMLType.F32, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q6_K}
    data = data_nbytes(plan)
    assert data == 799_525_120
    natural = synthetic_file_size(**GEMMA3_1B)
    header = natural - data
    # the real file's metadata (6,530,848 bytes) is larger than ours, so padding reaches its size
    target_header = REAL_FILE_SIZES["1b"] - data
    assert target_header == 6_530_848 and header <= target_header and target_header % 32 == 0
    by_name = {name: t for name, _, t in plan}
    assert by_name["token_embd.weight"] == GGMLType.Q8_0  # 1152 % 256 != 0
    assert by_name["blk.0.ffn_down.weight"] == GGMLType.Q6_K  # 6912 = 27 * 256
    assert by_name["blk.3.ffn_down.weight"] == GGMLType.Q4_K
    assert by_name["blk.0.attn_v.weight"] == GGMLType.Q8_0  # Q6_K fallback, ne0 = 1152
    assert by_name["blk.3.attn_v.weight"] == GGMLType.Q5_0  # Q4_K fallback
    assert by_name["blk.3.attn_output.weight"] == GGMLType.Q4_K  # ne0 = 1024


def test_270m_twin_written_matches_real_layout(tmp_path, real_model_path):
    path = write_gemma3_gguf(
        tmp_path / "twin.gguf", **GEMMA3_270M, file_size=REAL_FILE_SIZES["270m"]
    )
    assert path.stat().st_size == REAL_FILE_SIZES["270m"]
    with GGUFFile(path) as twin, GGUFFile(real_model_path) as real:
        assert twin.data_offset == real.data_offset
        layout = [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in twin.tensors.values()]
        assert layout == [
            (t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in real.tensors.values()
        ]
        c_twin, c_real = model_config_from_gguf(twin), model_config_from_gguf(real)
        assert c_twin == type(c_real)(**{**c_real.__dict__, "name": c_twin.name})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gemma3_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", **TINY)


def test_tiny_model_config(tiny):
    assert tiny.stat().st_size == synthetic_file_size(**TINY)
    with GGUFFile(tiny) as g:
        c = model_config_from_gguf(g)
        assert (c.hidden_size, c.num_layers, c.intermediate_size) == (256, 4, 512)
        assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (2, 1, 128, 1024)
        assert c.sliding_window == 16 and c.sliding_window_layers == (True, False, True, False)
        assert c.tie_word_embeddings and c.rope_theta == 1e6 and c.rope_theta_local == 10000.0
        assert g.tensors["token_embd.weight"].ggml_type == GGMLType.Q6_K  # 256-wide rows


def test_tiny_weights_finite_and_scales_in_range(tiny):
    with GGUFFile(tiny) as g:
        for info in g.tensors.values():
            rows, _ = info.rows_cols
            raw = g.tensor_bytes(info.name).reshape(rows, info.row_bytes)
            values = dequantize_ref(torch.from_numpy(raw.copy()), info.ggml_type)
            assert torch.isfinite(values).all(), info.name
            ref = gguf.quants.dequantize(raw[:4], gguf.GGMLQuantizationType(int(info.ggml_type)))
            assert np.array_equal(values[:4].numpy(), ref)
            _, block_bytes = QUANT_SIZES[info.ggml_type]
            blocks = raw.reshape(-1, block_bytes)
            if info.ggml_type == GGMLType.F32:
                assert abs(values.mean().item() - 1.0) < 0.05  # norm weights hold 1 + w
                continue
            d_off = 208 if info.ggml_type == GGMLType.Q6_K else 0
            d = blocks[:, d_off : d_off + 2].copy().view(np.float16).astype(np.float32)
            assert (d >= 0.0019).all() and (d <= 0.0221).all(), info.name
            if info.ggml_type == GGMLType.Q4_K:
                dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
                assert (dmin >= 0.0019).all() and (dmin <= 0.0221).all()
            if info.ggml_type == GGMLType.Q6_K:
                sc = blocks[:, 192:208].view(np.int8)
                assert sc.min() >= 1 and sc.max() <= 31


def test_tiny_tokenizer_metadata(tiny):
    with GGUFFile(tiny) as g:
        m = g.metadata
        tokens = m["tokenizer.ggml.tokens"]
        types = m["tokenizer.ggml.token_type"]
        scores = m["tokenizer.ggml.scores"]
        assert len(tokens) == len(types) == len(scores) == 1024 and len(set(tokens)) == 1024
        assert m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.pre"] == "default"
        assert tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
        assert tokens[105:107] == ["<start_of_turn>", "<end_of_turn>"]
        assert all(types[i] == 3 for i in (0, 1, 2, 3, 105, 106))
        first_byte = tokens.index("<0x00>")
        assert tokens[first_byte : first_byte + 256] == [f"<0x{b:02X}>" for b in range(256)]
        assert (types[first_byte : first_byte + 256] == 6).all()
        for piece in ("▁", "a", "Z", "7", "?", "▁the", "▁hello", "▁world"):
            assert types[tokens.index(piece)] == 1, piece
        normal = scores[types == 1]
        assert (np.diff(normal) < 0).all()  # distinct, decreasing: a strict merge order
        assert m["tokenizer.ggml.bos_token_id"] == 2 and m["tokenizer.ggml.eos_token_id"] == 1
        assert m["tokenizer.ggml.add_bos_token"] is True
        assert m["tokenizer.ggml.add_space_prefix"] is False
        assert m["general.file_type"] == 15 and m["general.architecture"] == "gemma3"


def test_vocab_fills_large_sizes():
    tokens, scores, types = synthetic_vocab(262144)
    assert len(tokens) == len(set(tokens)) == 262144
    assert len(scores) == len(types) == 262144
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        synthetic_vocab(300)


def test_seed_determinism(tmp_path):
    a = write_gemma3_gguf(tmp_path / "a.gguf", **TINY, seed=3).read_bytes()
    b = write_gemma3_gguf(tmp_path / "b.gguf", **TINY, seed=3).read_bytes()
    c = write_gemma3_gguf(tmp_path / "c.gguf", **TINY, seed=4).read_bytes()
    assert a == b and a != c and len(a) == len(c)


@pytest.mark.parametrize("mix", ["Q8_0", "F16", "F32"])
def test_other_mixes(tmp_path, mix):
    path = write_gemma3_gguf(tmp_path / "m.gguf", **TINY, mix=mix)
    assert path.stat().st_size == synthetic_file_size(**TINY, mix=mix)
    with GGUFFile(path) as g:
        types = {t.ggml_type for t in g.tensors.values() if len(t.shape) == 2}
        assert types == {GGMLType[mix]}
        values = dequantize_ref(
            torch.from_numpy(g.tensor_bytes("blk.0.attn_q.weight").copy()),
            g.tensors["blk.0.attn_q.weight"].ggml_type,
        )
        assert torch.isfinite(values).all()


def test_file_size_padding(tmp_path):
    natural = synthetic_file_size(**TINY)
    path = write_gemma3_gguf(tmp_path / "p.gguf", **TINY, file_size=natural + 4096)
    assert path.stat().st_size == natural + 4096
    with GGUFFile(path) as g:
        assert "general.description" in g.metadata
    with pytest.raises(ValueError, match="cannot pad to file_size"):
        write_gemma3_gguf(tmp_path / "q.gguf", **TINY, file_size=natural - 4096)
    with pytest.raises(ValueError, match="cannot pad to file_size"):
        write_gemma3_gguf(tmp_path / "q.gguf", **TINY, file_size=natural + 7)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1"):
        write_gemma3_gguf(tmp_path / "x.gguf", **{**TINY, "n_layers": 0})
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        write_gemma3_gguf(tmp_path / "x.gguf", **{**TINY, "n_head": 3, "n_kv_head": 2})
    with pytest.raises(ValueError, match="unknown mix 'Q2_K'"):
        write_gemma3_gguf(tmp_path / "x.gguf", **TINY, mix="Q2_K")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    main([str(out), "--preset", "tiny", "--seed", "1"])
    assert out.stat().st_size == synthetic_file_size(**TINY)
    assert "wrote" in capsys.readouterr().out
