"""quant_dequant on the GPU: embedding rows and bf16 workspaces against dequantize_ref."""

from __future__ import annotations

import pytest
import torch

from llcuda.kernels import quant_pack as qp
from llcuda.kernels.dequant_ref import dequantize_ref
from tests.kernels.test_quant_matmul import ALL_TYPES, _fits, random_rows


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_embedding_rows_and_bf16_workspace(qtype):
    from llcuda.kernels.quant_dequant import dequantize_bf16, embedding_rows
    from llcuda.kernels.quant_matmul import _WPG
    from llcuda.kernels.quant_tc import plane_major

    gen = torch.Generator(device="cuda").manual_seed(int(qtype))
    for k, n in [(640, 300), (1152, 1000), (6912, 64)]:
        if not _fits(qtype, k):
            continue
        raw = random_rows(qtype, n, k, gen, device="cuda")
        w = qp.pack_weight(raw, qtype, k)
        w_ref = dequantize_ref(raw, qtype)  # [N, K] fp32
        ids = torch.tensor([0, n - 1, 7, 7, 123 % n], device="cuda")
        rows = embedding_rows(w, ids, 33.9)
        # the same fp32 value up to one rounding (an FMA where the reference multiplies, adds)
        torch.testing.assert_close(rows, 33.9 * w_ref[ids], rtol=1e-6, atol=1e-6)
        assert embedding_rows(w, ids[:0]).shape == (0, k)
        # bf16 rounding of the same fp32 value, in plane-major column order
        torch.testing.assert_close(dequantize_bf16(w).float(),
                                   plane_major(w_ref, _WPG[int(qtype)]).float(),
                                   rtol=2**-8, atol=1e-7)


@pytest.mark.gpu
def test_embedding_rows_rejects_ids_elsewhere():
    from llcuda.kernels.quant_dequant import embedding_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = qp.pack_weight(random_rows(qp.Q8_0, 10, 64, gen, device="cuda"), qp.Q8_0, 64)
    with pytest.raises(ValueError, match="1-D"):
        embedding_rows(w, torch.tensor([1, 2]))  # on the CPU


@pytest.mark.gpu
def test_embedding_rows_into_a_buffer():
    """A decode burst gathers each step's embeddings straight into the graph's input rows."""
    from llcuda.kernels.quant_dequant import embedding_rows

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=dev).manual_seed(3)
    w = qp.pack_weight(random_rows(qp.Q8_0, 50, 64, gen, device=dev), qp.Q8_0, 64)
    ids = torch.tensor([4, 49, 4], device=dev)
    buffer = torch.full((5, 64), float("nan"), device=dev)
    out = embedding_rows(w, ids, 2.5, out=buffer[:3])
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[:3], embedding_rows(w, ids, 2.5), rtol=0, atol=0)
    assert buffer[3:].isnan().all()  # rows past the batch untouched
    for bad in (buffer[:2], buffer[:3].double(), buffer[:3, :32]):
        with pytest.raises(ValueError, match="out must be"):
            embedding_rows(w, ids, 2.5, out=bad)
