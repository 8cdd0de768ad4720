"""quant_mixes: llama-quantize's tensor types for Q3_K_M, Q2_K, IQ4_XS, IQ2_XS (and Q4_K_M), the
quantizers behind the twins in those mixes, and tiny synthetic models in them on the CPU."""

from __future__ import annotations

from collections import Counter

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from llcuda.gguf.bench_twins import BENCH_PRESETS, bench_plan
from llcuda.gguf.constants import GGMLType
from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES
from llcuda.gguf.quant_mixes import fallback, mix_type
from llcuda.gguf.quantize import quantize
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.synthetic import GEMMA3_270M, TINY, tensor_plan, write_gemma3_gguf
from llcuda.gguf.twins import TWIN_MIXES, write_twin
from llcuda.kernels.dequant_ref import SUPPORTED_TYPES, dequantize_ref
from tests.models.forward_helpers import open_gemma, sequence_logits

NEW_MIXES = ["Q3_K_M", "Q2_K", "IQ4_XS", "IQ2_XS"]


def type_counts(plan) -> dict[str, int]:
    return dict(Counter(t.name for _, _, t in plan))


# Llama 3.1 8B (32 layers, n_head / n_kv_head = 4, untied): 66 F32 tensors in every mix. Q4_K_M
# matches the real file (bench_twins' docstring); the others follow from the rules of
# quant_mixes' docstring (no importance matrix).
LLAMA_8B_COUNTS = {
    "Q4_K_M": {"Q4_K": 193, "Q6_K": 33, "F32": 66},
    "Q3_K_M": {"Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1, "F32": 66},
    "Q2_K": {"Q2_K": 129, "Q3_K": 64, "Q4_K": 32, "Q6_K": 1, "F32": 66},
    "IQ4_XS": {"IQ4_XS": 189, "Q5_K": 36, "Q6_K": 1, "F32": 66},
    "IQ2_XS": {"IQ2_XS": 188, "Q2_K": 5, "Q4_K": 32, "Q5_K": 1, "F32": 66},
}


@pytest.mark.parametrize("mix", list(LLAMA_8B_COUNTS))
def test_llama_8b_mix_counts(mix):
    assert type_counts(bench_plan(BENCH_PRESETS["llama-3.1-8b"], mix)) == LLAMA_8B_COUNTS[mix]


def test_mix_rules_per_tensor():
    # Q3_K_M: attn_v Q5_K on the first two layers; ffn_down Q5_K below n_layers / 16
    assert mix_type("Q3_K_M", "blk.1.attn_v.weight", 4096, 1, 32) == GGMLType.Q5_K
    assert mix_type("Q3_K_M", "blk.2.attn_v.weight", 4096, 2, 32) == GGMLType.Q4_K
    assert mix_type("Q3_K_M", "blk.1.ffn_down.weight", 14336, 1, 32) == GGMLType.Q5_K
    assert mix_type("Q3_K_M", "blk.2.ffn_down.weight", 14336, 2, 32) == GGMLType.Q4_K
    assert mix_type("Q3_K_M", "blk.2.attn_qkv.weight", 3072, 2, 32) == GGMLType.Q4_K  # phi3
    # Q2_K / IQ2_XS attn_v by GQA; the IQ2_XS head is Q5_K, an untied embedding Q2_K
    assert mix_type("Q2_K", "blk.0.attn_v.weight", 4096, 0, 32, n_gqa=2) == GGMLType.Q3_K
    assert mix_type("IQ2_XS", "blk.0.attn_v.weight", 4096, 0, 32, n_gqa=2) == GGMLType.Q2_K
    assert mix_type("IQ2_XS", "output.weight", 4096, 0, 32) == GGMLType.Q5_K
    assert mix_type("IQ2_XS", "token_embd.weight", 4096, 0, 32) == GGMLType.Q2_K
    assert mix_type("IQ2_XS", "token_embd.weight", 4096, 0, 32, tied=True) == GGMLType.Q5_K
    # output rows that the default block does not divide: Q8_0
    assert mix_type("IQ4_XS", "output.weight", 640, 0, 18) == GGMLType.Q8_0
    with pytest.raises(ValueError, match="unknown mix"):
        mix_type("Q5_K_S", "output.weight", 4096, 0, 32)


def test_fallbacks():
    assert fallback(GGMLType.IQ2_XS, 640) == GGMLType.IQ4_NL
    assert fallback(GGMLType.IQ4_XS, 1152) == GGMLType.IQ4_NL
    assert fallback(GGMLType.Q3_K, 640) == GGMLType.Q4_0
    assert fallback(GGMLType.Q2_K, 640) == GGMLType.Q4_0
    assert fallback(GGMLType.Q5_K, 640) == GGMLType.Q5_1
    assert fallback(GGMLType.Q3_K, 48) == GGMLType.F16  # not even a multiple of 32
    assert fallback(GGMLType.Q3_K, 512) == GGMLType.Q3_K


def test_gemma_270m_plans_fall_back():
    # 640-wide rows take the 32-element fallbacks, as in real Gemma 3 270M files of these types
    plans = {mix: type_counts(tensor_plan(**GEMMA3_270M, mix=mix)) for mix in NEW_MIXES}
    assert "IQ4_NL" in plans["IQ4_XS"] and "IQ4_XS" in plans["IQ4_XS"]  # ffn_down rows: 2048
    assert "IQ4_NL" in plans["IQ2_XS"] and "IQ2_XS" in plans["IQ2_XS"]
    # Q3_K_M: every Q3_K tensor has 640-wide rows (q, k, v, gate, up) and falls back to Q4_0
    assert "Q4_0" in plans["Q3_K_M"] and "Q3_K" not in plans["Q3_K_M"]
    assert "Q4_0" in plans["Q2_K"] and "Q8_0" in plans["Q2_K"]  # the 640-wide tied head
    for counts in plans.values():
        assert set(counts) <= {t.name for t in SUPPORTED_TYPES}


@pytest.mark.parametrize("qtype", [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL,
                                   GGMLType.IQ4_XS, GGMLType.IQ2_XS])  # fmt: skip
def test_quantizers_round_trip(qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((16, 512)).astype(np.float32)
    x[3] = 0.0
    raw = quantize(x, qtype)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))
    ours = dequantize_ref(torch.from_numpy(np.ascontiguousarray(raw)), qtype).numpy()
    assert np.array_equal(ours.view(np.int32), ref.astype(np.float32).view(np.int32))
    assert (ours[3] == 0).all()
    rms = float(np.sqrt(((ours - x) ** 2).mean()))
    # 2-bit types lose about a third of a unit-variance input, 4-bit types a tenth
    limit = {GGMLType.Q2_K: 0.4, GGMLType.IQ2_XS: 0.4, GGMLType.Q3_K: 0.22}.get(qtype, 0.1)
    assert rms < limit, (qtype.name, rms)


def test_twins_in_mixes_hold_their_types(tmp_path):
    expected = {
        "llama3-q3_k_m": {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32"},
        "llama3-q2_k": {"Q2_K", "Q3_K", "Q6_K", "F32"},
        "llama3-iq4_xs": {"IQ4_XS", "Q6_K", "F32"},
        "llama3-iq2_xs": {"IQ2_XS", "Q2_K", "Q5_K", "F32"},
    }
    assert set(expected) == set(TWIN_MIXES)
    for twin, types in expected.items():
        with GGUFFile(write_twin(tmp_path / f"{twin}.gguf", twin)) as g:
            assert {t.ggml_type.name for t in g.tensors.values()} == types, twin


@pytest.mark.parametrize("mix", NEW_MIXES)
def test_tiny_gemma_in_mix_runs_on_cpu(mix, tmp_path):
    path = write_gemma3_gguf(tmp_path / f"{mix}.gguf", **TINY, mix=mix)
    gg, model = open_gemma(path, "cpu")
    try:
        gg.check_supported(SUPPORTED_ARCHITECTURES, SUPPORTED_TYPES)  # the loader's check
        types = {t.ggml_type for t in gg.tensors.values()}
        logits = sequence_logits(model, [2, 10, 20, 30, 40], [3, 4], chunk=8, block_size=16)
    finally:
        gg.close()
    assert GGMLType[{"Q3_K_M": "Q3_K"}.get(mix, mix)] in types
    assert logits.shape == (2, TINY["vocab_size"]) and torch.isfinite(logits).all()
