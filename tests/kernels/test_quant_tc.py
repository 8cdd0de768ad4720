"""The tensor-core variants of quant_tc against `x.float() @ dequantize_ref(raw).T` (GPU)."""

from __future__ import annotations

import pytest
import torch

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
