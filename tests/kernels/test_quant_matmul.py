"""Triton quantized matmuls against `x.float() @ dequantize_ref(raw).T` over real model shapes.

The GPU tests run on the device machine; the packing tests (no `gpu` mark) run everywhere: the
repacked layout must dequantize bit-exactly like the raw GGUF blocks.
"""

from __future__ import annotations

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.kernels import quant_pack as qp
from llcuda.kernels.dequant_ref import dequantize_ref

QUANT_TYPES = [
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
]
FLOAT_TYPES = [GGMLType.F16, GGMLType.BF16, GGMLType.F32]
ALL_TYPES = QUANT_TYPES + FLOAT_TYPES

# (K in features, N out features) of Gemma 3 270M and 1B, plus odd N
MODEL_SHAPES = [
    (640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640), (640, 262144),
    (1152, 1024), (1152, 256), (1024, 1152), (1152, 6912), (6912, 1152), (1152, 262144),
]
ODD_SHAPES = [(1152, 7), (1152, 1000), (2048, 7), (6912, 1000)]
BATCHES = [1, 2, 7, 16, 33, 128, 512]

# f16 scale fields of each block type (byte offsets), overwritten with small finite scales
_F16_FIELDS = {
    GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
    GGMLType.Q8_0: [0], GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}


def random_rows(qtype: GGMLType, n_rows: int, n_cols: int, gen: torch.Generator,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Random GGUF rows uint8 [n_rows, row_bytes]: random quants, f16 scales in [0.002, 0.022],
    Q6_K int8 scales in 1..31; float types get N(0, 0.05) values."""
    qid = int(qtype)
    if qid in qp.FLOAT_TYPES:
        v = torch.randn((n_rows, n_cols), generator=gen, device=device) * 0.05
        return v.to(qp.FLOAT_TYPES[qid]).view(torch.uint8).reshape(n_rows, -1)
    elems, block_bytes, _ = qp.QUANT_BLOCKS[qid]
    nb = n_cols // elems
    raw = torch.randint(0, 256, (n_rows, nb, block_bytes), generator=gen, device=device,
                        dtype=torch.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = torch.rand((n_rows, nb, 1), generator=gen, device=device) * 0.02 + 0.002
        raw[..., off : off + 2] = scale.half().view(torch.uint8)
    if qtype == GGMLType.Q6_K:
        raw[..., 192:208] = torch.randint(1, 32, (n_rows, nb, 16), generator=gen, device=device,
                                          dtype=torch.uint8)
    return raw.reshape(n_rows, -1)


def _fits(qtype: GGMLType, k: int) -> bool:
    return k % qp.QUANT_BLOCKS[int(qtype)][0] == 0


def _cases(shapes):
    return [pytest.param(t, k, n, id=f"{t.name}-{k}x{n}") for t in ALL_TYPES for k, n in shapes
            if _fits(t, k)]


# ---------------------------------------------------------------------------------------------
# Packing (CPU): the repacked layout means exactly what the raw blocks mean


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_pack_roundtrip_bit_exact(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    for n_rows, n_cols in [(3, 256), (5, 512), (2, 1024)]:
        raw = random_rows(qtype, n_rows, n_cols, gen)
        w = qp.pack_weight(raw, qtype, n_cols)
        assert torch.equal(qp.dequantize_packed(w), dequantize_ref(raw, qtype))
        assert w.nbytes <= 1.1 * raw.numel()


def test_pack_rejects_bad_input():
    raw = torch.zeros((4, 18 * 2), dtype=torch.uint8)
    with pytest.raises(qp.QuantPackError, match="take 36 bytes"):
        qp.pack_weight(raw[:, :30], GGMLType.Q4_0, 64)
    with pytest.raises(qp.QuantPackError, match="multiple of 32"):
        qp.pack_weight(raw, GGMLType.Q4_0, 48)
    with pytest.raises(qp.QuantPackError, match="multiple of 256"):
        qp.pack_weight(torch.zeros((1, 144), dtype=torch.uint8), GGMLType.Q4_K, 128)
    with pytest.raises(qp.QuantPackError, match="unsupported quant type"):
        qp.pack_weight(raw, GGMLType.NVFP4, 64)
    with pytest.raises(qp.QuantPackError, match="uint8"):
        qp.pack_weight(raw.float(), GGMLType.Q4_0, 64)


def test_fuse_packed_concatenates_rows():
    gen = torch.Generator().manual_seed(7)
    a_raw, b_raw = (random_rows(GGMLType.Q4_K, n, 512, gen) for n in (3, 5))
    fused = qp.fuse_packed([qp.pack_weight(a_raw, GGMLType.Q4_K, 512),
                            qp.pack_weight(b_raw, GGMLType.Q4_K, 512)])
    assert fused.split_sizes == (3, 5) and fused.n_rows == 8
    assert torch.equal(qp.dequantize_packed(fused),
                       dequantize_ref(torch.cat([a_raw, b_raw]), GGMLType.Q4_K))
    with pytest.raises(qp.QuantPackError, match="share qtype"):
        qp.fuse_packed([qp.pack_weight(a_raw, GGMLType.Q4_K, 512),
                        qp.pack_weight(random_rows(GGMLType.Q8_0, 3, 512, gen), GGMLType.Q8_0,
                                       512)])



@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0],
                         ids=lambda t: t.name)
def test_pack_in_row_chunks_equals_one_chunk(qtype, monkeypatch):
    raw = random_rows(qtype, 8, 512, torch.Generator().manual_seed(5))
    whole = qp.pack_weight(raw, qtype, 512)
    monkeypatch.setattr(qp, "_PACK_CHUNK_ROWS", 3)  # chunks of 3, 3 and 2 rows
    chunked = qp.pack_weight(raw, qtype, 512)
    for a, b in zip(whole.tensors(), chunked.tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qtype", [GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
def test_packed_clone_owns_its_memory(qtype):
    """clone() (how weights leave the load's scratch pool) copies every array: a float type's
    packed weight is a view of the raw rows, its clone is not."""
    raw = random_rows(qtype, 4, 512, torch.Generator().manual_seed(3))
    packed = qp.pack_weight(raw, qtype, 512)
    copy = packed.clone()
    assert (copy.qtype, copy.n_rows, copy.n_cols) == (packed.qtype, 4, 512)
    for a, b in zip(packed.tensors(), copy.tensors(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and b.is_contiguous()
    raw.zero_()
    assert torch.equal(qp.dequantize_packed(copy), dequantize_ref(
        random_rows(qtype, 4, 512, torch.Generator().manual_seed(3)), qtype))

# ---------------------------------------------------------------------------------------------
# Kernels (CUDA)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _gemv_err(qtype, out: torch.Tensor, x: torch.Tensor, w_ref: torch.Tensor, n: int) -> float:
    """_rel_err of a default decode GEMV's out against its spec: x @ w_ref.T, or where gemv_int8
    turns INT8_X on, quantize_q8_ref(x) @ w_ref.T (kernels/q8_activations), where an activation
    at a rounding tie may take either neighbour (_q8_spec_err)."""
    from llcuda.kernels.quant_matmul import gemv_int8

    m, k = x.shape
    if not gemv_int8(int(qtype), m, n, k // 32):  # fp32 activations: nothing left open
        return _rel_err(out, x.float() @ w_ref.T)
    return _q8_spec_err(out, x, w_ref)


def _q8_spec_err(out: torch.Tensor, x: torch.Tensor, w_ref: torch.Tensor) -> float:
    """_rel_err of an INT8_X GEMV's out [M, N] against quantize_q8_ref(x) @ w_ref.T, beyond what
    the activations at rounding ties (q8_tie_slack: either neighbour) can move each output."""
    from llcuda.kernels.q8_activations import q8_tie_slack, quantize_q8_ref

    ref = quantize_q8_ref(x) @ w_ref.T
    slack = q8_tie_slack(x) @ w_ref.abs().T
    excess = ((out.float() - ref).abs() - slack).clamp_min(0.0)
    return (excess.norm() / ref.norm().clamp_min(1e-30)).item()


def _check_all_m(qtype, k, n, batches, x_dtype=torch.float32):
    from llcuda.kernels.matmul_path import GEMV_MAX_M
    from llcuda.kernels.quant_matmul import quant_matmul

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    gen = torch.Generator(device="cuda").manual_seed(1000 * int(qtype) + k + n)
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w = qp.pack_weight(raw, qtype, k)
    w_ref = dequantize_ref(raw, qtype)  # [N, K] fp32
    del raw
    failures = []
    for m in batches:
        x = torch.randn((m, k), generator=gen, device="cuda").to(x_dtype)
        # fp32 FMAs (GEMV, on x or its int8 form) land far under 1e-5; bf16 products (tensor
        # cores) near 3e-3
        gemv = m <= GEMV_MAX_M
        out = quant_matmul(x, w)
        torch.cuda.synchronize()
        tol = 2e-5 if gemv else 1.5e-2
        err = _gemv_err(qtype, out, x, w_ref, n) if gemv else _rel_err(out, x.float() @ w_ref.T)
        if out.shape != (m, n) or out.dtype != torch.float32:
            failures.append(f"M={m}: got {tuple(out.shape)} {out.dtype}")
        elif not torch.isfinite(out).all() or err > tol:
            failures.append(f"M={m}: rel err {err:.3g} > {tol}")
    assert not failures, f"{qtype.name} K={k} N={n}: " + "; ".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,k,n", _cases(MODEL_SHAPES + ODD_SHAPES))
def test_quant_matmul_matches_reference(qtype, k, n):
    _check_all_m(qtype, k, n, BATCHES)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K,
                                   GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16],
                         ids=lambda t: t.name)
def test_gemv_kernel_up_to_16_rows(qtype):
    """quant_matmul routes M > GEMV_MAX_M to tensor cores; the fp32 kernel itself takes M <= 16."""
    from llcuda.kernels.quant_matmul import GEMV_KERNEL_MAX_M, quant_gemv

    gen = torch.Generator(device="cuda").manual_seed(int(qtype))
    k, n = 2048, 1000
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w = qp.pack_weight(raw, qtype, k)
    w_ref = dequantize_ref(raw, qtype)
    for m in (3, 7, GEMV_KERNEL_MAX_M):
        x = torch.randn((m, k), generator=gen, device="cuda")
        assert _rel_err(quant_gemv(x, w), x @ w_ref.T) < 2e-5, f"M={m}"


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q6_K],
                         ids=lambda t: t.name)
def test_quant_matmul_half_activations(qtype, x_dtype):
    _check_all_m(qtype, 2048, 640, [1, 3, 64], x_dtype=x_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.F16],
                         ids=lambda t: t.name)
def test_fp16_tensor_core_path_scales_rows(qtype):
    """The sm_75 path: fp16 products with per-row power-of-two scaling, forced on this GPU.
    Activations far past fp16's 65504 must not overflow."""
    from llcuda.kernels.quant_matmul import quant_gemm

    gen = torch.Generator(device="cuda").manual_seed(5)
    k, n = 2048, 640
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w = qp.pack_weight(raw, qtype, k)
    x = torch.randn((37, k), generator=gen, device="cuda")
    x[3] *= 1e6  # one huge row, one zero row
    x[5] = 0.0
    ref = x @ dequantize_ref(raw, qtype).T
    out = quant_gemm(x, w, use_fp16=True)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 5e-3
    assert _rel_err(out[3], ref[3]) < 5e-3
    assert torch.equal(out[5], torch.zeros_like(out[5]))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0],
                         ids=lambda t: t.name)
def test_gemm_split_k_equals_unsplit(qtype):
    """Split-K (decode batches through narrow projections) sums the same products: any split,
    including a last split shorter than the rest, matches the unsplit kernel and the reference."""
    from llcuda.kernels.quant_matmul import gemm_config, quant_gemm

    gen = torch.Generator(device="cuda").manual_seed(11 + int(qtype))
    k, n, m = 6912, 1152, 64
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w = qp.pack_weight(raw, qtype, k)
    x = torch.randn((m, k), generator=gen, device="cuda")
    ref = x @ dequantize_ref(raw, qtype).T
    base = gemm_config(int(qtype), m, n, k // 32)
    assert base["SPLIT_K"] > 1, "the heuristic should split this shape"
    unsplit = quant_gemm(x, w, dict(base, SPLIT_K=1))
    for split in (2, 5, base["SPLIT_K"], 10_000):  # 10_000: clamped to one step per split
        out = quant_gemm(x, w, dict(base, SPLIT_K=split))
        assert _rel_err(out, unsplit) < 1e-5, f"SPLIT_K={split}"
        assert _rel_err(out, ref) < 1.5e-2, f"SPLIT_K={split}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 40])
def test_fused_gate_up_one_launch(m):
    from llcuda.kernels.matmul_path import GEMV_MAX_M
    from llcuda.kernels.quant_matmul import quant_matmul_fused

    gen = torch.Generator(device="cuda").manual_seed(11)
    k, n = 1152, 6912
    raws = [random_rows(GGMLType.Q5_0, n, k, gen, device="cuda") for _ in range(2)]
    fused = qp.fuse_packed([qp.pack_weight(r, GGMLType.Q5_0, k) for r in raws])
    x = torch.randn((m, k), generator=gen, device="cuda")
    gate, up = quant_matmul_fused(x, fused)
    gemv = m <= GEMV_MAX_M
    tol = 2e-5 if gemv else 1.5e-2
    for out, raw in zip((gate, up), raws, strict=True):
        assert out.shape == (m, n)
        w_ref = dequantize_ref(raw, GGMLType.Q5_0)
        # the fused weight's 2n rows decide the GEMV's activations
        err = _gemv_err(GGMLType.Q5_0, out, x, w_ref, 2 * n) if gemv else _rel_err(out, x @ w_ref.T)
        assert err < tol


@pytest.mark.gpu
def test_quant_matmul_rejects_bad_arguments():
    from llcuda.kernels.quant_matmul import QuantMatmulError, quant_matmul

    gen = torch.Generator(device="cuda").manual_seed(3)
    w = qp.pack_weight(random_rows(GGMLType.Q8_0, 8, 64, gen, device="cuda"), GGMLType.Q8_0, 64)
    with pytest.raises(QuantMatmulError, match="K=32"):
        quant_matmul(torch.randn(2, 32, device="cuda"), w)
    with pytest.raises(QuantMatmulError, match="float32, bfloat16 or float16"):
        quant_matmul(torch.ones(2, 64, device="cuda", dtype=torch.int32), w)
    with pytest.raises(QuantMatmulError, match="2-D"):
        quant_matmul(torch.randn(64, device="cuda"), w)
    with pytest.raises(QuantMatmulError, match="PackedWeight"):
        quant_matmul(torch.randn(2, 64, device="cuda"), torch.zeros(8, 64, device="cuda"))
    assert quant_matmul(torch.randn(0, 64, device="cuda"), w).shape == (0, 8)
    # a strided activation view is accepted
    x = torch.randn(4, 128, device="cuda")[:, ::2]
    ref = x @ qp.dequantize_packed(w).T
    assert _rel_err(quant_matmul(x, w), ref) < 2e-5


def test_matmul_path_by_batch_and_size():
    from llcuda.kernels.matmul_path import matmul_path

    qkv, gate_up, head = (1152, 1536), (1152, 13824), (1152, 262144)  # (K, N) of Gemma 3 1B
    assert [matmul_path(m, qkv[1], qkv[0]) for m in (1, 4, 5, 16, 32, 512)] == [
        "gemv", "gemv", "gemm", "gemm", "dense", "dense"]
    assert [matmul_path(m, gate_up[1], gate_up[0]) for m in (16, 32, 128, 129, 512)] == [
        "gemm", "swap", "swap", "dense", "dense"]
    assert [matmul_path(m, head[1], head[0]) for m in (1, 16, 64, 128, 256)] == [
        "gemv", "gemm", "swap", "swap", "gemm"]
    # Llama-3.1-8B: gate|up's 235 MB workspace goes dense past SWAP_MAX_M all the same (in
    # DENSE_CHUNK_BYTES chunks), its 128,256-row head does not
    gate_up_8b, head_8b = (4096, 28672), (4096, 128256)
    assert [matmul_path(m, gate_up_8b[1], gate_up_8b[0]) for m in (16, 128, 129, 512)] == [
        "gemm", "swap", "dense", "dense"]
    assert matmul_path(512, head_8b[1], head_8b[0]) == "gemm"
    # below sm_80 every batch past the GEMV takes the fused kernel's fp16 path
    assert {matmul_path(m, *qkv[::-1], bf16=False) for m in (16, 64, 512)} == {"gemm"}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
def test_partials_sum_to_the_product(m):
    """partials=True hands back [S, M, N] split-K pieces (S >= 1) whose sum is the product."""
    from llcuda.kernels.quant_matmul import quant_matmul

    gen = torch.Generator(device="cuda").manual_seed(m)
    k, n = 6912, 1152  # ffn_down: tall K, few rows, split on every path that splits
    raw = random_rows(GGMLType.Q4_K, n, k, gen, device="cuda")
    w = qp.pack_weight(raw, GGMLType.Q4_K, k)
    x = torch.randn((m, k), generator=gen, device="cuda")
    parts = quant_matmul(x, w, partials=True)
    assert parts.dim() == 3 and parts.shape[1:] == (m, n)
    assert _rel_err(parts.float().sum(dim=0), quant_matmul(x, w)) < 1e-5



@pytest.mark.gpu
@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("qtype,k,ffn", [
    (GGMLType.Q5_0, 640, 2048), (GGMLType.Q5_0, 1152, 6912), (GGMLType.Q4_K, 1024, 300),
    (GGMLType.Q6_K, 256, 40), (GGMLType.F16, 64, 24), (GGMLType.Q4_K, 2048, 8192),
    (GGMLType.Q8_0, 896, 4864),
], ids=lambda v: getattr(v, "name", str(v)))  # fmt: skip
def test_gemv_gated_epilogue(qtype, k, ffn, m, act):
    """A gate|up weight's GEMV with GATED_OUT stores act(gate) * up (GEGLU or SwiGLU): each
    program pairs gate rows with the up rows of the same outputs. Equals the activation of the
    plain product (reference.gated_act_ref), and ops.quant_matmul_gated takes it for decode
    rows (Llama 3.2 1B's and Qwen2.5 0.5B's gate|up among the shapes)."""
    from llcuda.kernels import ops
    from llcuda.kernels import reference as ref
    from llcuda.kernels.quant_matmul import QuantMatmulError, quant_gemv

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(int(qtype) + k + m)
    parts = [qp.pack_weight(random_rows(qtype, ffn, k, gen, device=dev), qtype, k)
             for _ in range(2)]  # fmt: skip
    w = qp.fuse_packed(parts)
    x = torch.randn((m, k), generator=gen, device=dev) * 4
    want = ref.gated_act_ref(quant_gemv(x, w), act)
    got = quant_gemv(x, w, gated_act=act)
    assert got.shape == (m, ffn)
    # GELU_tanh(g) = 0.5 g (1 + tanh(..)) cancels for large negative g: the kernel's tanh and
    # torch's differ by an ulp of 1, i.e. ~|g| |up| 6e-8 absolute (K=2048 failed 1e-4 on the
    # H100), so the absolute tolerance scales with the products' size
    tol = {"rtol": 1e-4, "atol": 1e-4 * max(1.0, want.abs().max().item())}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ops.quant_matmul_gated(x, w, act), want, **tol)
    uneven = qp.fuse_packed([parts[0], qp.pack_weight(random_rows(qtype, 2 * ffn, k, gen,
                                                                  device=dev), qtype, k)])
    with pytest.raises(QuantMatmulError, match="two equal halves"):
        quant_gemv(x, uneven, gated_act=act)
    with pytest.raises(QuantMatmulError, match="relu"):
        quant_gemv(x, w, gated_act="relu")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("qtype,k,n", [
    p for p in _cases([(1152, 1280), (1024, 300), (6912, 1152)])
    if p.values[0] in (GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16)
])  # fmt: skip
def test_gemv_preload_moves_loads_not_sums(qtype, k, n, m):
    """The first K step's weights loaded before the PDL wait (PRELOAD) give the same sums as
    loading them after it (to rounding: the peeled first step may contract its multiply-adds
    differently), in one whole-row step (the default at one row) and in the first of several
    K steps (at 3 rows); both agree with the reference."""
    from llcuda.kernels.quant_matmul import (
        GEMV_PRELOAD_MAX_GROUPS,
        GEMV_PRELOAD_MAX_N,
        gemv_config,
        quant_gemv,
    )

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(int(qtype) + k + m)
    raw = random_rows(qtype, n, k, gen, device=dev)
    w = qp.pack_weight(raw, qtype, k)
    x = torch.randn((m, k), generator=gen, device=dev)
    cfg = gemv_config(int(qtype), m, n, k // 32, 132)
    if m == 1 and k // 32 <= GEMV_PRELOAD_MAX_GROUPS and n <= GEMV_PRELOAD_MAX_N:
        assert cfg["PRELOAD"] and cfg["BLOCK_G"] >= k // 32  # the whole row in one step
    preloaded = quant_gemv(x, w, config=dict(cfg, PRELOAD=True))
    assert _rel_err(preloaded, quant_gemv(x, w, config=dict(cfg, PRELOAD=False))) < 1e-6
    assert _gemv_err(qtype, preloaded, x, dequantize_ref(raw, qtype).float(), n) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("k,types", [
    (1152, (GGMLType.Q5_0, GGMLType.Q8_0)),  # Gemma 3 1B: q|k, and v on a use_more_bits layer
    (640, (GGMLType.Q5_0, GGMLType.Q8_0)),  # 270M
    (1024, (GGMLType.Q4_K, GGMLType.Q6_K)),
], ids=["1152-q5_0-q8_0", "640-q5_0-q8_0", "1024-q4_k-q6_k"])  # fmt: skip
def test_gemv_pair_equals_two_gemvs(k, types):
    """Two weights of different types over one input in one launch: [A | B] equals each GEMV
    alone, bit for bit (the same programs compute them)."""
    from llcuda.kernels.quant_matmul import gemv_pair_config, quant_gemv, quant_gemv_pair

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(k)
    m = 1
    wa = qp.pack_weight(random_rows(types[0], 1280, k, gen, device=dev), types[0], k)
    wb = qp.pack_weight(random_rows(types[1], 256, k, gen, device=dev), types[1], k)
    x = torch.randn((m, k), generator=gen, device=dev)
    both = quant_gemv_pair(x, wa, wb)
    assert both.shape == (m, 1536)
    torch.testing.assert_close(both[:, :1280], quant_gemv(x, wa), rtol=0, atol=0)
    torch.testing.assert_close(both[:, 1280:], quant_gemv(x, wb), rtol=0, atol=0)
    want = x @ torch.cat([qp.dequantize_packed(wa), qp.dequantize_packed(wb)]).T
    torch.testing.assert_close(both, want, rtol=1e-4, atol=1e-3)
    # no shared launch: another K, a K-split weight, several rows (their narrow outputs split K)
    assert gemv_pair_config(torch.zeros(3, k, device=dev), wa, wb) is None
    other = qp.pack_weight(random_rows(types[1], 256, 2 * k, gen, device=dev), types[1], 2 * k)
    assert gemv_pair_config(x, wa, other) is None
    tall = qp.pack_weight(random_rows(GGMLType.Q4_K, 64, 14336, gen, device=dev), GGMLType.Q4_K,
                          14336)  # fmt: skip
    assert gemv_pair_config(torch.zeros(1, 14336, device=dev), tall, tall) is None
    assert gemv_pair_config(torch.zeros(64, k, device=dev), wa, wb) is None


@pytest.mark.gpu
@pytest.mark.parametrize("types", [(GGMLType.Q4_K, GGMLType.Q6_K), (GGMLType.Q5_0, GGMLType.Q8_0)],
                         ids=["q4_k-q6_k", "q5_0-q8_0"])  # fmt: skip
def test_gemv_pair_int8_reads_prequantized_x(types):
    """The pair kernel in int8 activations: with x's Q8Rows (as the norm writes them) it gives
    what it gives quantizing x itself, and both are dequant(w) @ quantize_q8_ref(x)."""
    from llcuda.kernels.q8_activations import pack_q8_ref, quantize_q8_ref
    from llcuda.kernels.quant_matmul import gemv_pair_config, quant_gemv_pair

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(7)
    k = 2048
    wa = qp.pack_weight(random_rows(types[0], 640, k, gen, device=dev), types[0], k)
    wb = qp.pack_weight(random_rows(types[1], 128, k, gen, device=dev), types[1], k)
    x = torch.randn((1, k), generator=gen, device=dev)
    configs = tuple(dict(c, INT8_X=True) for c in gemv_pair_config(x, wa, wb))
    own = quant_gemv_pair(x, wa, wb, configs)
    pre = quant_gemv_pair(torch.full_like(x, float("nan")), wa, wb, configs, xq=pack_q8_ref(x))
    want = quantize_q8_ref(x) @ torch.cat([qp.dequantize_packed(wa), qp.dequantize_packed(wb)]).T
    scale = want.abs().max().item()
    torch.testing.assert_close(own, want, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(pre, own, rtol=1e-5, atol=1e-5 * scale)


# (K, N) of 4B-8B decode projections, then odd N; gated: a gate|up weight with its epilogue
INT8_SHAPES = [(2560, 3072), (4096, 1024), (10240, 2560), (14336, 4096), (1152, 1000), (2048, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("preload", [False, True], ids=["tiles", "preload"])
@pytest.mark.parametrize("qtype,k,n", [(t, k, n) for t in QUANT_TYPES for k, n in INT8_SHAPES
                                       if _fits(t, k)], ids=str)  # fmt: skip
def test_gemv_int8_activations_match_their_spec(qtype, k, n, preload, m):
    """The INT8_X decode GEMV computes dequant(w) @ quantize_q8_ref(x) (kernels/q8_activations),
    for every split, tile and preload config the heuristics give: the int8 products are exact, so
    only fp32 summation order remains."""
    from llcuda.kernels.q8_activations import pack_q8_ref, quantize_q8_ref
    from llcuda.kernels.quant_matmul import gemv_config, quant_gemv

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(k + n)
    w = qp.pack_weight(random_rows(qtype, n, k, gen, device=dev), qtype, k)
    x = torch.randn((m, k), generator=gen, device=dev)
    x[:, 64:96] = 0.0  # an all-zero group: scale 0, no division by it
    cfg = dict(gemv_config(int(qtype), m, n, k // 32, 132, preload=preload), INT8_X=True)
    want = quantize_q8_ref(x) @ qp.dequantize_packed(w).T
    got = quant_gemv(x, w, config=cfg)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
    # x quantized beforehand (as the norms write it) gives the same sums, x itself unread
    xq = pack_q8_ref(x)
    got_pre = quant_gemv(torch.full_like(x, float("nan")), w, config=cfg, xq=xq)
    torch.testing.assert_close(got_pre, got, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if n % 2 == 0 and m == 1:  # the SwiGLU epilogue on the same weight read as gate|up
        gate, up = want[:, : n // 2], want[:, n // 2 :]
        for q in (None, xq):
            gu = quant_gemv(x, w, config=cfg, gated_act="silu", xq=q)
            torch.testing.assert_close(gu, torch.nn.functional.silu(gate) * up, rtol=1e-3,
                                       atol=1e-3 * (gate.abs().max() * up.abs().max()).item())
