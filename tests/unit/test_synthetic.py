"""Synthetic Gemma 3 GGUF writer: the Q4_K_M mix, twins of the real files, a usable tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from llcuda.gguf.arch_spec import llama3_rope_factors
from llcuda.gguf.bench_twins import BENCH_PRESETS, bench_plan
from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.quantize import quantize
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
from llcuda.gguf.synthetic_vocab import bpe_vocab
from llcuda.gguf.tokenizer import Tokenizer
from llcuda.gguf.twins import (
    TWIN_MIXES,
    TWINS,
    TYPE_CYCLE,
    permute_for_norm_rope,
    sha256_file,
    write_twin,
)
from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.layers.quant_tensor import read_float_tensor


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
    with pytest.raises(ValueError, match="unknown mix 'Q5_K_S'"):
        write_gemma3_gguf(tmp_path / "x.gguf", **TINY, mix="Q5_K_S")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    main([str(out), "--preset", "tiny", "--seed", "1"])
    assert out.stat().st_size == synthetic_file_size(**TINY)
    assert "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------------ architecture twins


@pytest.mark.parametrize("qtype", ["F16", "Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_quantize_round_trips_through_gguf_and_llcuda(qtype):
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal((6, 512))).astype(np.float32)
    x[0] = 0.0  # an all-zero block
    x[1] = np.abs(x[1])  # no negative values: min 0
    t = GGMLType[qtype]
    data = quantize(x, t)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    assert ref.shape == x.shape and np.isfinite(ref).all()
    assert (ref[0] == 0).all()
    # relative RMS error of a plain fit: 4-bit ~8%, 5-bit ~4%, 6-bit ~2%, 8-bit ~0.5%
    bound = {"F16": 1e-3, "Q4_0": 0.1, "Q8_0": 0.01, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}
    assert np.sqrt(((ref - x) ** 2).mean()) / x.std() < bound[qtype]
    if qtype != "F16":  # llcuda's dequantizer reads our blocks exactly as gguf-py does
        ours = dequantize_ref(torch.from_numpy(data.copy()), t)
        assert np.array_equal(ours.numpy(), ref)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 96), np.float32), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="cannot quantize to IQ3_S"):
        quantize(np.zeros((2, 256), np.float32), GGMLType.IQ3_S)
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(256, np.float32), GGMLType.Q8_0)


def test_llama_permutation_is_undone_by_the_reverse_permutation():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2 * 8, 3)  # 2 heads of head_dim 8
    p = permute_for_norm_rope(w, 2)
    # transformers' reverse permutation (LlamaTensorProcessor._reverse_permute_weights)
    back = p.reshape(2, 4, 2, 3).swapaxes(2, 1).reshape(w.shape)
    assert np.array_equal(back, w)
    # within a head, HF rows i and i + 4 (a rotate-half pair) become adjacent rows 2i, 2i + 1
    assert np.array_equal(p[:2], w[[0, 4]]) and np.array_equal(p[8:10], w[[8, 12]])


def test_llama3_rope_factors():
    f = llama3_rope_factors(TWINS["llama3"])
    assert f.shape == (32,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0  # short wavelengths untouched, long ones divided by 8
    assert ((f[1:] - f[:-1]) >= 0).all() and ((f > 1) & (f < 8)).any()


@pytest.mark.parametrize("twin", list(TWINS))
def test_twin_file(twin, tmp_path):
    spec = TWINS[twin]
    path = write_twin(tmp_path / "t.gguf", twin)
    assert path.stat().st_size < 4_000_000
    with GGUFFile(path) as g:
        assert g.architecture == spec.arch
        names = set(g.tensors)
        assert ("output.weight" in names) == (not spec.tied)
        assert ("rope_freqs.weight" in names) == (spec.llama3_rope is not None)
        assert ("blk.0.attn_q.bias" in names) == spec.has_biases
        assert ("blk.0.attn_q_norm.weight" in names) == spec.has_qk_norm
        assert ("blk.0.attn_qkv.weight" in names) == (spec.arch == "phi3")
        types = {t.ggml_type for t in g.tensors.values() if len(t.shape) == 2}
        if twin not in TWIN_MIXES:  # those: test_quant_mixes.py
            assert types == set(TYPE_CYCLE)
        assert all(t.ggml_type == GGMLType.F32 for t in g.tensors.values() if len(t.shape) == 1)
        m = g.metadata
        assert m[f"{spec.arch}.embedding_length"] == spec.n_embd
        assert m[f"{spec.arch}.attention.head_count_kv"] == spec.n_kv_head
        if spec.arch in ("qwen3", "gemma2", "gemma3", "llama"):
            assert m[f"{spec.arch}.attention.key_length"] == spec.head_dim
        if spec.arch == "gemma2":
            assert m["gemma2.attn_logit_softcapping"] == spec.attn_softcap
            assert "gemma2.rope.freq_base" not in m
        tok = Tokenizer.from_metadata(m)
        text = "hello world, the quick brown fox 123"
        assert tok.decode(tok.encode(text)).strip() == text
        if spec.is_gemma:  # GGUF norms hold 1 + w
            norm = read_float_tensor(g, "blk.0.attn_norm.weight")
            assert abs(norm.mean().item() - 1.0) < 0.05


def test_twin_determinism_and_qwen3_head_dim(tmp_path):
    a = sha256_file(write_twin(tmp_path / "a.gguf", "qwen3", seed=0))
    b = sha256_file(write_twin(tmp_path / "b.gguf", "qwen3", seed=0))
    c = sha256_file(write_twin(tmp_path / "c.gguf", "qwen3", seed=1))
    assert a == b != c
    with GGUFFile(tmp_path / "a.gguf") as g:
        c = model_config_from_gguf(g)
        assert (c.head_dim, c.num_heads, c.hidden_size) == (64, 8, 256)  # 64 != 256 / 8
        assert g.tensors["blk.0.attn_q.weight"].shape == (256, 512)
    with pytest.raises(ValueError, match="unknown twin 'mistral'"):
        write_twin(tmp_path / "x.gguf", "mistral")


def test_bpe_vocab_merges_are_well_formed():
    tokens, types, merges, bos, eos = bpe_vocab(1024, "llama-bpe")
    assert len(tokens) == len(set(tokens)) == len(types) == 1024
    assert tokens[bos] == "<|begin_of_text|>" and tokens[eos] == "<|eot_id|>"
    vocab = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab


def test_bench_plans_match_real_q4_k_m_files():
    # llama-quantize's own summaries of the real Q4_K_M files
    counts = {
        "llama-3.2-1b": (96, 17, 34),
        "llama-3.2-3b": (168, 29, 58),
        "llama-3.1-8b": (193, 33, 66),
        "qwen2.5-7b": (169, 29, 141),
    }
    for preset, (n_q4, n_q6, n_f32) in counts.items():
        types = [t for _, _, t in bench_plan(BENCH_PRESETS[preset])]
        got = (types.count(GGMLType.Q4_K), types.count(GGMLType.Q6_K), types.count(GGMLType.F32))
        assert got == (n_q4, n_q6, n_f32), preset
    plan = {name: t for name, _, t in bench_plan(BENCH_PRESETS["llama-3.1-8b"])}
    assert plan["output.weight"] == GGMLType.Q6_K and plan["token_embd.weight"] == GGMLType.Q4_K
    tied = {name: t for name, _, t in bench_plan(BENCH_PRESETS["llama-3.2-1b"])}
    assert tied["token_embd.weight"] == GGMLType.Q6_K and "output.weight" not in tied


def test_bench_twin_cli(tmp_path, monkeypatch, capsys):
    small = dataclasses.replace(
        BENCH_PRESETS["qwen2.5-7b"], n_embd=256, n_layers=2, n_ff=512, n_head=4, n_kv_head=2,
        head_dim=64, vocab_size=1024,
    )  # fmt: skip
    monkeypatch.setitem(BENCH_PRESETS, "qwen2.5-7b", small)
    out = tmp_path / "bench.gguf"
    main([str(out), "--preset", "qwen2.5-7b"])
    assert "wrote" in capsys.readouterr().out
    with GGUFFile(out) as g:
        c = model_config_from_gguf(g)
        assert (c.architecture, c.num_layers, c.tie_word_embeddings) == ("qwen2", 2, False)
        for info in g.tensors.values():
            rows, _ = info.rows_cols
            raw = g.tensor_bytes(info.name).reshape(rows, info.row_bytes)
            assert torch.isfinite(
                dequantize_ref(torch.from_numpy(raw.copy()), info.ggml_type)
            ).all()
    main([str(out), "--preset", "qwen2.5-7b", "--mix", "Q3_K_M"])  # the bench twins take any mix
    with GGUFFile(out) as g:
        assert g.metadata["general.file_type"] == 12
        assert g.tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.Q3_K
    with pytest.raises(SystemExit):
        main([str(out), "--preset", "qwen2.5-7b", "--mix", "Q5_K_S"])
