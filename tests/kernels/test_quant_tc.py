"""The tensor-core variants of quant_tc against `x.float() @ dequantize_ref(raw).T` (GPU), and
the dense path's bf16 GEMM alone against the fp32 product of the same bf16 operands.
Set TRITON_INTERPRET=1 and call test_dense_gemm_edges, test_dense_gemm_split_k or
test_dense_partials_through_quant_matmul directly to run them on the CPU."""

from __future__ import annotations

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.kernels import quant_pack as qp
from llcuda.kernels.dequant_ref import dequantize_ref
from tests.kernels.test_quant_matmul import ALL_TYPES, _fits, _rel_err, random_rows

SHAPES = [(1152, 1536), (6912, 1152), (640, 4096), (2048, 640), (1152, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_swap_and_dense_match_reference(qtype):
    from llcuda.kernels.quant_tc import quant_gemm_dense, quant_gemm_swap

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(int(qtype))
    failures = []
    for k, n in SHAPES:
        if not _fits(qtype, k):
            continue
        raw = random_rows(qtype, n, k, gen, device="cuda")
        w = qp.pack_weight(raw, qtype, k)
        w_ref = dequantize_ref(raw, qtype)
        for m in (5, 16, 33, 64, 128, 300):
            x = torch.randn((m, k), generator=gen, device="cuda")
            ref = x @ w_ref.T
            for name, fn in (("swap", quant_gemm_swap), ("dense", quant_gemm_dense)):
                out = fn(x, w)
                err = _rel_err(out, ref)
                if out.shape != (m, n) or out.dtype != torch.float32 or not err < 1.5e-2:
                    failures.append(f"{name} K={k} N={n} M={m}: {tuple(out.shape)} err {err:.3g}")
    assert not failures, "; ".join(failures)


@pytest.mark.gpu
def test_dense_gemm_edges():
    """dense_gemm (the Triton GEMM that keeps cuBLAS off the GPU path) over M, N and K tails
    (K = 96: half a K step), with its own tile choice and with 128x128 tiles forced, against the
    fp32 product of the same bf16 operands: only the accumulation order differs, so it agrees to
    ~1e-6, far inside the ~3e-3 a bf16 rounding anywhere would cost."""
    from llcuda.kernels.quant_tc import dense_config, dense_gemm

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(0)
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
           "num_stages": 3}  # fmt: skip
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = []
    try:
        for k in (64, 96, 640, 1152):
            for n in (40, 1152, 1300):
                b = torch.randn((n, k), generator=gen, device=dev).bfloat16()
                for m in (1, 33, 130, 513):
                    a = torch.randn((m, k), generator=gen, device=dev).bfloat16()
                    ref = a.float() @ b.float().t()
                    for cfg in (dense_config(m, n, k), big):
                        out = dense_gemm(a, b, cfg)
                        err = _rel_err(out, ref)
                        worst = ((out - ref).abs().max() / ref.abs().max()).item()
                        if (out.shape != (m, n) or out.dtype != torch.float32
                                or not (err < 1e-5 and worst < 1e-4)):  # fmt: skip
                            failures.append(f"M={m} N={n} K={k} {cfg['BLOCK_M']}x"
                                            f"{cfg['BLOCK_N']}: err {err:.3g} worst {worst:.3g}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert not failures, "; ".join(failures)


@pytest.mark.gpu
def test_dense_gemm_split_k():
    """dense_gemm with K split 2 and 3 ways, over K that no split count divides into whole steps
    of 64 (K = 96, 1000, 6900: the last split ends in half a step) or into equal runs of them
    (640: 4 + 4 + 2 steps), both as partial sums [S, M, N] (their sum is the product) and added
    up to [M, N], against the fp32 product of the same bf16 operands. Also the split count that
    dense_config picks itself for the tall-K shapes it is meant for."""
    from llcuda.kernels.quant_matmul import _split_groups
    from llcuda.kernels.quant_tc import dense_config, dense_gemm

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(1)
    failures = []

    def check(a, b, cfg, what):
        ref = a.float() @ b.float().t()
        m, n, k = a.shape[0], b.shape[0], a.shape[1]
        splits = _split_groups(k, cfg["SPLIT_K"], cfg["BLOCK_K"])[1]
        parts = dense_gemm(a, b, cfg, partials=True)
        summed = dense_gemm(a, b, cfg)
        for name, out, shape in (("partials", parts, (splits, m, n)), ("summed", summed, (m, n))):
            got = out.sum(dim=0) if name == "partials" else out
            err = _rel_err(got, ref)
            worst = ((got - ref).abs().max() / ref.abs().max()).item()
            if (out.shape != shape or out.dtype != torch.float32
                    or not (err < 1e-5 and worst < 1e-4)):  # fmt: skip
                failures.append(f"{what} {name}: {tuple(out.shape)} vs {shape}, err {err:.3g} "
                                f"worst {worst:.3g}")

    for k in (96, 640, 1000, 1152, 6900, 6912):
        for n in (40, 200):
            b = torch.randn((n, k), generator=gen, device=dev).bfloat16()
            for m in (33, 130):
                a = torch.randn((m, k), generator=gen, device=dev).bfloat16()
                for split in (2, 3):
                    cfg = dict(dense_config(m, n, k), SPLIT_K=split)
                    check(a, b, cfg, f"M={m} N={n} K={k} SPLIT_K={split}")
    for m, n, k in ((128, 640, 2048), (100, 1152, 6912)):
        cfg = dense_config(m, n, k, partials=True)
        assert cfg["SPLIT_K"] > 1, (m, n, k, cfg)
        a = torch.randn((m, k), generator=gen, device=dev).bfloat16()
        b = torch.randn((n, k), generator=gen, device=dev).bfloat16()
        check(a, b, cfg, f"M={m} N={n} K={k} own config")
    assert not failures, "; ".join(failures)


@pytest.mark.gpu
def test_dense_partials_through_quant_matmul():
    """quant_matmul(..., partials=True) on a product that takes the dense path returns the GEMM's
    split-K partial sums [S, M, N] (S > 1 for this tall-K shape), which add up to the product."""
    from llcuda.kernels.matmul_path import matmul_path
    from llcuda.kernels.quant_matmul import quant_matmul

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(2)
    qtype, k, n, m = GGMLType.Q4_K, 2048, 640, 128  # Gemma 3 270M's ffn_down at a 128-row prefill
    assert matmul_path(m, n, k) == "dense"
    raw = random_rows(qtype, n, k, gen, device=dev)
    w = qp.pack_weight(raw, qtype, k)
    x = torch.randn((m, k), generator=gen, device=dev)
    ref = x @ dequantize_ref(raw, qtype).float().T
    parts = quant_matmul(x, w, partials=True)
    assert parts.dim() == 3 and parts.shape[0] > 1 and parts.shape[1:] == (m, n), parts.shape
    assert _rel_err(parts.sum(dim=0), ref) < 1.5e-2
    summed = quant_matmul(x, w)
    assert summed.shape == (m, n) and _rel_err(summed, ref) < 1.5e-2
    assert _rel_err(summed, parts.sum(dim=0)) < 1e-5  # the same sums, split another way


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q8_0],
                         ids=lambda t: t.name)
def test_dense_in_row_chunks_is_the_one_pass_product(qtype, monkeypatch):
    """A matrix past DENSE_CHUNK_BYTES is expanded and multiplied a chunk of rows at a time into
    one product (here at most 6 row tiles a chunk over 1000 rows: two chunks of 4 tiles), with
    the same sums as expanding it whole; its split-K partials (K=2048 at M=130 splits) add up to
    them."""
    from llcuda.kernels import quant_tc
    from llcuda.kernels.quant_dequant import dequantize_bf16

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(3)
    k, n, m = 2048, 1000, 130
    raw = random_rows(qtype, n, k, gen, device=dev)
    w = qp.pack_weight(raw, qtype, k)
    x = torch.randn((m, k), generator=gen, device=dev)
    whole = quant_tc.dense_gemm(quant_tc.plane_major(x, quant_tc._WPG[qtype]), dequantize_bf16(w))
    monkeypatch.setattr(quant_tc, "DENSE_CHUNK_BYTES", 2 * k * 128 * 6 + 100)
    chunked = quant_tc.quant_gemm_dense(x, w)
    assert chunked.shape == (m, n) and _rel_err(chunked, whole) < 1e-5
    assert _rel_err(chunked, x @ dequantize_ref(raw, qtype).float().T) < 1.5e-2
    parts = quant_tc.quant_gemm_dense(x, w, partials=True)
    assert parts.dim() == 3 and parts.shape[0] > 1 and parts.shape[1:] == (m, n), parts.shape
    assert _rel_err(parts.sum(dim=0), chunked) < 1e-5
    with pytest.raises(ValueError, match="unit stride"):
        quant_tc.dense_gemm(x.bfloat16(), dequantize_bf16(w), out=torch.empty(1, n, m).mT)
    with pytest.raises(qp.QuantPackError, match="outside"):
        qp.row_slice(w, 0, n + 1)
