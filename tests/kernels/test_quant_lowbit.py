"""The low-bit types on the GPU path against `dequantize_ref`: Q2_K (quant_lowbit's
natural-order packing), Q3_K, IQ4_NL, IQ4_XS (plane types of quant_matmul's kernels) and the grid
types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4 (their raw fields,
decoded per element by quant_lowbit / quant_iq).

Three groups:
- packing (CPU, every run): each layout dequantizes bit-exactly like the raw blocks and stays
  within 1.05x of their bytes;
- small shapes through the Triton kernels, on CUDA or on the CPU under TRITON_INTERPRET=1
  (skipped otherwise; the interpreter takes seconds per kernel);
- `gpu`: the real shapes (Llama 3.1 8B, Qwen2.5 7B, Gemma 3 1B for IQ4_NL), odd N, M in 1..512,
  the fp16 path, split-K, the engine's embedding gather, and tiny Gemma 3 models in the real
  mixes on the GPU against the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels import quant_pack as qp
from llcuda.kernels.dequant_ref import dequantize_ref

IQ4 = [GGMLType.IQ4_NL, GGMLType.IQ4_XS]  # nibble types of quant_matmul's plane kernels
PLANE = [GGMLType.Q3_K] + IQ4  # quant_matmul's plane kernels, in layouts of their own
MAIN = [GGMLType.Q2_K] + PLANE
FIELD = [GGMLType(t) for t in qp.FIELD_TYPES]
LOWBIT = [GGMLType.Q2_K] + FIELD  # quant_lowbit's kernels
NEW = MAIN + FIELD
_F16_FIELDS = {GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.IQ4_NL: [0],
               GGMLType.IQ4_XS: [0], GGMLType.IQ2_XXS: [0], GGMLType.IQ2_XS: [0],
               GGMLType.IQ2_S: [0], GGMLType.IQ3_XXS: [0], GGMLType.IQ3_S: [0],
               GGMLType.IQ1_S: [0], GGMLType.IQ1_M: [], GGMLType.TQ1_0: [52],
               GGMLType.TQ2_0: [64], GGMLType.MXFP4: []}  # fmt: skip
# IQ4_XS reaches d * 32 * 127: smaller d keeps its outputs near the others'
_SCALE = {GGMLType.IQ4_XS: 0.25}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CAN_RUN_TRITON = torch.cuda.is_available() or INTERPRET
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def interpreter_loops(monkeypatch):
    """Triton 3.6's interpreter turns a loop bound into int(1-element array), which numpy 2.4
    refuses: make it take the element, so kernels with runtime loop bounds run interpreted."""
    if not INTERPRET:
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)  # records the real __index__, which the scope restores after
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    yield


def random_rows(qtype: GGMLType, n_rows: int, n_cols: int, gen: torch.Generator,
                device: str = "cpu") -> torch.Tensor:  # fmt: skip
    """Random blocks uint8 [n_rows, row_bytes] with f16 scales in [0.002, 0.022]."""
    elems, block_bytes = QUANT_SIZES[qtype]
    nb = n_cols // elems
    raw = torch.randint(0, 256, (n_rows, nb, block_bytes), generator=gen, device=device,
                        dtype=torch.uint8)  # fmt: skip
    for off in _F16_FIELDS[qtype]:
        scale = torch.rand((n_rows, nb, 1), generator=gen, device=device) * 0.02 + 0.002
        raw[..., off : off + 2] = (scale * _SCALE.get(qtype, 1.0)).half().view(torch.uint8)
    if qtype == GGMLType.IQ1_M:  # the f16 d in the top nibbles of the four u16 scales
        d = (torch.rand((n_rows, nb), generator=gen, device=device) * 0.02 + 0.002).half()
        bits = d.view(torch.int16).to(torch.int32) & 0xFFFF
        for k in range(4):
            hi = raw[..., 49 + 2 * k].to(torch.int32)
            raw[..., 49 + 2 * k] = ((hi & 0x0F) | (((bits >> (4 * k)) & 15) << 4)).to(torch.uint8)
    if qtype == GGMLType.MXFP4:  # e8m0 exponents near 2^-8: values up to 12 * 2^-6
        raw[..., 0] = torch.randint(118, 123, (n_rows, nb), generator=gen, device=device,
                                    dtype=torch.uint8)  # fmt: skip
    return raw.reshape(n_rows, -1)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_pack_roundtrip_bit_exact_and_size(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    for n_rows, n_cols in [(3, 256), (5, 512), (2, 1024), (1, 4096)]:
        if qtype in FIELD and qtype != GGMLType.MXFP4:
            assert not torch.isnan(dequantize_ref(random_rows(qtype, 2, 256, gen), qtype)).any()
        raw = random_rows(qtype, n_rows, n_cols, gen)
        w = qp.pack_weight(raw, qtype, n_cols)
        assert torch.equal(qp.dequantize_packed(w), dequantize_ref(raw, qtype))
        assert w.nbytes <= 1.05 * raw.numel(), (w.nbytes, raw.numel())
    assert qp.pack_weight(random_rows(qtype, 2, 256, gen), qtype, 256).type_name == qtype.name


def test_iq4_nl_rows_of_32_multiples():
    # IQ4_NL is the 32-element fallback of the IQ types: rows such as Gemma's 640 or 1152
    gen = torch.Generator().manual_seed(1)
    for n_cols in (32, 640, 1152):
        raw = random_rows(GGMLType.IQ4_NL, 3, n_cols, gen)
        w = qp.pack_weight(raw, GGMLType.IQ4_NL, n_cols)
        assert torch.equal(qp.dequantize_packed(w), dequantize_ref(raw, GGMLType.IQ4_NL))


@pytest.mark.parametrize("qtype", [GGMLType.Q3_K, GGMLType.IQ4_XS], ids=lambda t: t.name)
def test_lowbit_fuse_and_chunked_pack(qtype, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    a_raw, b_raw = random_rows(qtype, 3, 512, gen), random_rows(qtype, 5, 512, gen)
    fused = qp.fuse_packed([qp.pack_weight(a_raw, qtype, 512), qp.pack_weight(b_raw, qtype, 512)])
    assert fused.split_sizes == (3, 5)
    assert torch.equal(qp.dequantize_packed(fused), dequantize_ref(torch.cat([a_raw, b_raw]),
                                                                   qtype))  # fmt: skip
    whole = qp.pack_weight(a_raw, qtype, 512)
    monkeypatch.setattr(qp, "_PACK_CHUNK_ROWS", 2)
    for x, y in zip(whole.tensors(), qp.pack_weight(a_raw, qtype, 512).tensors(), strict=True):
        assert torch.equal(x, y)


def test_types_without_gpu_kernels_are_refused():
    with pytest.raises(qp.QuantPackError, match="unsupported quant type"):
        qp.pack_weight(torch.zeros((1, 36), dtype=torch.uint8), GGMLType.NVFP4, 64)


def test_every_type_the_cpu_computes_packs_for_the_gpu():
    from llcuda.kernels.dequant_ref import SUPPORTED_TYPES

    assert {int(t) for t in SUPPORTED_TYPES} <= set(qp.QUANT_BLOCKS)


# ------------------------------------------------------------------------ kernels, small shapes


@needs_triton
@pytest.mark.parametrize("qtype", LOWBIT, ids=lambda t: t.name)
def test_kernels_small_shapes(qtype):
    from llcuda.kernels.quant_lowbit import gemm_config, lowbit_gemm, lowbit_gemv, lowbit_rows

    gen = torch.Generator(device=DEV).manual_seed(int(qtype))
    n, k = 37, 512  # odd N; two super-blocks (16 MXFP4 / IQ4_NL blocks)
    raw = random_rows(qtype, n, k, gen, device=DEV)
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    for m in (1, 3):
        x = torch.randn((m, k), generator=gen, device=DEV)
        assert _rel_err(lowbit_gemv(x, w), x @ w_ref.T) < 2e-5, f"gemv M={m}"
    # split K: two splits of one super-block each, partial sums kept apart
    x = torch.randn((2, k), generator=gen, device=DEV)
    parts = lowbit_gemv(x, w, partials=True, config={"BLOCK_N": 16, "SPLIT_K": 2,
                                                     "num_warps": 4})  # fmt: skip
    assert parts.shape == (2, 2, n) and _rel_err(parts.sum(0), x @ w_ref.T) < 2e-5
    x = torch.randn((20, k), generator=gen, device=DEV)
    assert _rel_err(lowbit_gemm(x, w), x @ w_ref.T) < 1.5e-2
    split = lowbit_gemm(x, w, config={**gemm_config(20, n), "SPLIT_K": 2}, partials=True)
    assert split.shape == (2, 20, n) and _rel_err(split.sum(0), x @ w_ref.T) < 1.5e-2
    ids = torch.tensor([0, n - 1, 5, 5], device=DEV)
    rows = lowbit_rows(w, torch.empty((4, k), device=DEV), ids, scale=2.0)
    torch.testing.assert_close(rows, 2.0 * w_ref[ids], rtol=1e-6, atol=0)


@needs_triton
def test_routing_through_quant_matmul_and_embedding():
    from llcuda.kernels.quant_dequant import dequantize_bf16, embedding_rows
    from llcuda.kernels.quant_matmul import quant_matmul, uses_gemv

    gen = torch.Generator(device=DEV).manual_seed(3)
    qtype, n, k = GGMLType.Q2_K, 40, 256
    raw = random_rows(qtype, n, k, gen, device=DEV)
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    assert not uses_gemv(1, w)  # no gated epilogue / pairing: quant_lowbit's own GEMV
    x = torch.randn((2, k), generator=gen, device=DEV)
    assert _rel_err(quant_matmul(x, w), x @ w_ref.T) < 2e-5
    assert quant_matmul(x, w, partials=True).dim() == 3
    ids = torch.tensor([3, 39], device=DEV)
    torch.testing.assert_close(embedding_rows(w, ids, 0.5), 0.5 * w_ref[ids], rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize_bf16(w).float(), w_ref.bfloat16().float(), rtol=1e-2,
                               atol=1e-6)  # fmt: skip


@needs_triton
@pytest.mark.parametrize("qtype", PLANE, ids=lambda t: t.name)
@pytest.mark.parametrize("k,n,preload,m", [(2048, 7, True, 1), (2048, 7, False, 3),
                                           (1024, 40, False, 1), (2304, 34, True, 1)])
def test_plane_lowbit_int8_activations_match_their_spec(qtype, k, n, preload, m):
    """Q3_K (q + 4 as the unsigned byte, two 16-element scales per group) and IQ4_NL / IQ4_XS
    (code-book value + 128, zero point 128) in the INT8_X decode GEMV compute dequant(w) @
    quantize_q8_ref(x), tiled or whole-row, split or not, with and without the SwiGLU epilogue,
    quantizing x themselves or reading it quantized (Q8Rows)."""
    from llcuda.kernels import reference as ref
    from llcuda.kernels.q8_activations import pack_q8_ref, quantize_q8_ref
    from llcuda.kernels.quant_matmul import gemv_config, quant_gemv
    from tests.kernels.test_quant_matmul import _q8_spec_err

    gen = torch.Generator(device=DEV).manual_seed(k + n)
    w = qp.pack_weight(random_rows(qtype, n, k, gen, device=DEV), qtype, k)
    x = torch.randn((m, k), generator=gen, device=DEV)
    x[:, 64:96] = 0.0  # an all-zero group: scale 0
    cfg = dict(gemv_config(int(qtype), m, n, k // 32, 132, preload=preload), INT8_X=True)
    w_ref = qp.dequantize_packed(w)
    want = quantize_q8_ref(x) @ w_ref.T
    # quantizing x itself, an activation at a rounding tie may take either value (q8_tie_slack);
    # reading pack_q8_ref's quantization, none
    assert _q8_spec_err(quant_gemv(x, w, config=cfg), x, w_ref) < 2e-5
    assert _rel_err(quant_gemv(x, w, config=cfg, xq=pack_q8_ref(x)), want) < 2e-5
    if n % 2 == 0 and m == 1:
        got = quant_gemv(x, w, config=cfg, gated_act="silu")
        assert _rel_err(got, ref.gated_act_ref(want, "silu")) < 2e-5


@needs_triton
@pytest.mark.parametrize("qtype", PLANE, ids=lambda t: t.name)
def test_plane_lowbit_through_the_plane_kernels(qtype):
    """Q3_K (its low two bits in Q6_K's high-bit layout, its 3rd bits one int32 per group) and
    IQ4_NL / IQ4_XS (nibble types, the code book applied per word) run in quant_matmul's
    kernels: the GEMV, its gated epilogue and its two-type pairing, the fused tensor-core GEMM,
    the swapped and the dense GEMMs, the embedding gather."""
    from llcuda.kernels import quant_matmul as qm
    from llcuda.kernels import reference as ref
    from llcuda.kernels.quant_dequant import embedding_rows
    from llcuda.kernels.quant_tc import quant_gemm_dense, quant_gemm_swap

    gen = torch.Generator(device=DEV).manual_seed(int(qtype))
    n, k = 40, 512
    raws = [random_rows(qtype, n, k, gen, device=DEV) for _ in range(2)]
    ws = [qp.pack_weight(r, qtype, k) for r in raws]
    w, w_ref = ws[0], dequantize_ref(raws[0], qtype)
    for m in (1, 3):
        x = torch.randn((m, k), generator=gen, device=DEV)
        assert _rel_err(qm.quant_gemv(x, w), x @ w_ref.T) < 2e-5, f"gemv M={m}"
        gate_up = qp.fuse_packed(ws)
        want = ref.gated_act_ref(x @ dequantize_ref(torch.cat(raws), qtype).T, "silu")
        assert _rel_err(qm.quant_gemv(x, gate_up, gated_act="silu"), want) < 2e-5
    x = torch.randn((20, k), generator=gen, device=DEV)
    # the interpreter's bf16 tl.dot returns garbage (Q4_0 too): the fused GEMM's fp16 path there
    fused = lambda x, w: qm.quant_gemm(x, w, use_fp16=True if INTERPRET else None)  # noqa: E731
    for f in (fused, quant_gemm_swap, quant_gemm_dense):
        assert _rel_err(f(x, w), x @ w_ref.T) < 1.5e-2, f
    q5 = qp.pack_weight(random_q5_k(n, k, gen), GGMLType.Q5_K, k)
    x = torch.randn((1, k), generator=gen, device=DEV)
    both = qm.quant_gemv_pair(x, w, q5)
    torch.testing.assert_close(both[:, :n], qm.quant_gemv(x, w), rtol=0, atol=0)
    ids = torch.tensor([0, n - 1, 7], device=DEV)
    torch.testing.assert_close(embedding_rows(w, ids, 2.0), 2.0 * w_ref[ids], rtol=1e-6, atol=0)


def random_q5_k(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Q5_K rows (a Q5_K attn_v beside IQ4_XS q|k, as in the IQ4_XS mix)."""
    raw = torch.randint(0, 256, (n, k // 256, 176), generator=gen, device=DEV, dtype=torch.uint8)
    for off in (0, 2):
        s = torch.rand((n, k // 256, 1), generator=gen, device=DEV) * 0.02 + 0.002
        raw[..., off : off + 2] = s.half().view(torch.uint8)
    return raw.reshape(n, -1)


# ------------------------------------------------------------------------------ device: shapes

# (K, N): Llama 3.1 8B q/o, k/v, gate/up, down, LM head; Qwen2.5 7B q, k/v, down; odd N
MODEL_SHAPES = [
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256),
    (3584, 3584), (3584, 512), (18944, 3584),
]  # fmt: skip
IQ4_NL_SHAPES = [(1152, 1024), (1152, 6912), (6912, 1152), (640, 2048)]  # Gemma widths
ODD_SHAPES = [(4096, 7), (4096, 1000), (14336, 4097)]
BATCHES = [1, 2, 3, 4, 7, 16, 17, 33, 128, 512]


# the per-element decoders (FIELD types): the 8B layer shapes and odd N only
FIELD_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 7), (4096, 1000)]


def _cases():
    out = []
    for t in NEW:
        shapes = MODEL_SHAPES + ODD_SHAPES if t in MAIN else FIELD_SHAPES
        if t in (GGMLType.IQ4_NL, GGMLType.MXFP4):
            shapes = shapes + IQ4_NL_SHAPES  # 32-element blocks: Gemma's widths
        out += [pytest.param(t, k, n, id=f"{t.name}-{k}x{n}") for k, n in shapes]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,k,n", _cases())
def test_lowbit_matmul_matches_reference(qtype, k, n):
    from llcuda.kernels import matmul_path, quant_lowbit
    from llcuda.kernels.quant_matmul import quant_matmul
    from tests.kernels.test_quant_matmul import _gemv_err

    # quant_lowbit's GEMV takes up to 16 rows; IQ4_* run in quant_matmul's, which takes up to 4
    # and multiplies big matrices with int8 activations (their spec: quantize_q8_ref)
    gemv_max_m = quant_lowbit.GEMV_MAX_M if qtype in LOWBIT else matmul_path.GEMV_MAX_M

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1000 * int(qtype) + k + n)
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    assert w.nbytes <= 1.05 * raw.numel()
    del raw
    failures = []
    batches = [m for m in BATCHES if m <= 33] if n > 100_000 else BATCHES  # the LM head: memory
    for m in batches:
        x = torch.randn((m, k), generator=gen, device="cuda")
        out = quant_matmul(x, w)
        tol = 2e-5 if m <= gemv_max_m else 1.5e-2  # fp32 FMAs; bf16 products
        err = (_gemv_err(qtype, out, x, w_ref, n) if m <= gemv_max_m
               else _rel_err(out, x @ w_ref.T))  # fmt: skip
        if out.shape != (m, n) or not torch.isfinite(out).all() or err > tol:
            failures.append(f"M={m}: {tuple(out.shape)} rel err {err:.3g} > {tol}")
    assert not failures, f"{qtype.name} K={k} N={n}: " + "; ".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_half_activations(qtype, x_dtype):
    from llcuda.kernels.quant_matmul import quant_matmul

    gen = torch.Generator(device="cuda").manual_seed(7)
    k, n = 4096, 1000
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    for m in (1, 3, 64):
        x = torch.randn((m, k), generator=gen, device="cuda").to(x_dtype)
        tol = 2e-5 if m <= 16 else 1.5e-2
        assert _rel_err(quant_matmul(x, w), x.float() @ w_ref.T) < tol, f"M={m}"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_fp16_path_scales_rows(qtype):
    """The sm_75 path, forced: fp16 products with per-row power-of-two scaling."""
    from llcuda.kernels.quant_lowbit import lowbit_gemm
    from llcuda.kernels.quant_matmul import quant_gemm

    gen = torch.Generator(device="cuda").manual_seed(5)
    k, n = 4096, 640
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    x = torch.randn((37, k), generator=gen, device="cuda")
    x[3] *= 1e6
    x[5] = 0.0
    ref = x @ w_ref.T
    out = (quant_gemm if qtype in PLANE else lowbit_gemm)(x, w, use_fp16=True)
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 5e-3
    assert _rel_err(out[3], ref[3]) < 5e-3 and torch.equal(out[5], torch.zeros_like(out[5]))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", LOWBIT, ids=lambda t: t.name)
def test_gemm_split_k(qtype):
    """Decode batches past the GEMV through narrow projections split K: any split, a short last
    one included, sums what the unsplit kernel does."""
    from llcuda.kernels.quant_lowbit import gemm_config, lowbit_gemm

    gen = torch.Generator(device="cuda").manual_seed(19)
    k, n, m = 14336, 1024, 33
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    x = torch.randn((m, k), generator=gen, device="cuda")
    base = gemm_config(m, n, k, 132)
    assert base["SPLIT_K"] > 1, "the heuristic should split this shape"
    unsplit = lowbit_gemm(x, w, config=dict(base, SPLIT_K=1))
    for split in (2, 5, base["SPLIT_K"], 10_000):
        out = lowbit_gemm(x, w, config=dict(base, SPLIT_K=split))
        # the same bf16 products summed in fp32 in another order: 1.0-1.4e-5 apart on the H100
        assert _rel_err(out, unsplit) < 4e-5 and _rel_err(out, x @ w_ref.T) < 1.5e-2, split


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", LOWBIT, ids=lambda t: t.name)
def test_gemv_split_k_and_16_rows(qtype):
    from llcuda.kernels.quant_lowbit import gemv_config, lowbit_gemv

    gen = torch.Generator(device="cuda").manual_seed(13)
    k, n = 14336, 1000
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    for m in (1, 5, 16):
        x = torch.randn((m, k), generator=gen, device="cuda")
        base = gemv_config(m, n, k, 132)
        for split in (1, 3, base["SPLIT_K"], 10_000):  # 10_000: one K step per split
            out = lowbit_gemv(x, w, config=dict(base, SPLIT_K=split))
            assert _rel_err(out, x @ w_ref.T) < 2e-5, f"M={m} SPLIT_K={split}"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_embedding_rows(qtype):
    from llcuda.kernels.quant_dequant import embedding_rows

    gen = torch.Generator(device="cuda").manual_seed(17)
    k, n = 4096, 5000
    raw = random_rows(qtype, n, k, gen, device="cuda")
    w, w_ref = qp.pack_weight(raw, qtype, k), dequantize_ref(raw, qtype)
    ids = torch.tensor([0, 4999, 17, 17, 2500], device="cuda")
    torch.testing.assert_close(embedding_rows(w, ids, 3.0), 3.0 * w_ref[ids], rtol=1e-6, atol=0)


def _gpu_cpu_relative_diff(path) -> tuple[float, float]:
    """Mean and max |GPU - CPU| over the CPU's top-5 log-probs of a synthetic Gemma 3 file,
    teacher-forced over 41 tokens in 16-token chunks, relative to the CPU logits' spread (their
    standard deviation over the vocabulary, averaged over positions)."""
    from tests.models.forward_helpers import open_gemma, sequence_logits

    ids = [2] + [int(t) for t in torch.randint(300, 1000, (40,), generator=torch.Generator()
                                               .manual_seed(0))]  # fmt: skip
    logits = {}
    for dev in ("cpu", "cuda"):
        gguf, model = open_gemma(path, dev)
        try:
            logits[dev] = sequence_logits(model, ids, list(range(len(ids))), chunk=16,
                                          block_size=16).float().cpu()  # fmt: skip
        finally:
            gguf.close()
    assert torch.isfinite(logits["cuda"]).all()
    cpu, gpu = (torch.log_softmax(logits[d], dim=-1) for d in ("cpu", "cuda"))
    top = torch.topk(cpu, 5).indices
    diff = (cpu.gather(1, top) - gpu.gather(1, top)).abs()
    spread = logits["cpu"].std(dim=-1).mean().item()
    return diff.mean().item() / spread, diff.max().item() / spread


@pytest.mark.gpu
@pytest.mark.parametrize("mix", ["Q3_K_M", "Q2_K", "IQ4_XS", "IQ2_XS"])
@pytest.mark.parametrize("preset", ["tiny", "270m"])
def test_synthetic_gemma_in_mix_gpu_matches_cpu(mix, preset, tmp_path):
    """Random-weight Gemma 3 in a real mix (270m: 640-wide rows, so IQ4_NL / Q4_0 / Q5_1
    fallbacks) teacher-forced on the GPU against the CPU path.

    Both devices dequantize the same weights exactly and differ by the GPU's activation rounding
    (bf16 tensor-core products, fp16 KV cache). These random models' logits are huge (std 25 at
    270m, 80 on the tiny preset, 600 for tiny IQ2_XS; the top-5 tokens ~500 nats apart), so the
    rounding shows as tenths of a nat: the bound is relative to the logits' spread. On the H100:
    mean 1.0-3.3e-3 of it, max 0.4-1.6e-2, and 2.7-3.0e-3 / 1.1-1.6e-2 for the same models in
    Q4_K_M. A wrong decode changes the logits by their whole spread."""
    from llcuda.gguf.synthetic import PRESETS, write_gemma3_gguf

    path = write_gemma3_gguf(tmp_path / f"{preset}-{mix}.gguf", **PRESETS[preset], mix=mix)
    mean, mx = _gpu_cpu_relative_diff(path)
    assert mean < 5e-3 and mx < 3e-2, (preset, mix, mean, mx)


# ------------------------------------------------------------------- compiles (CPU, no device)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", LOWBIT, ids=lambda t: t.name)
def test_kernels_compile_for_h100_and_t4(qtype):
    """Every kernel compiles for sm_90 and, with the fp16 GEMM of sm_75, for the T4 within its
    64 KiB of shared memory (Triton compiles for a named target with the ptxas it ships)."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from llcuda.kernels import quant_lowbit as lb
    from tests.kernels.test_compile_targets import T4, T4_SMEM, _compile

    k = 512
    w = qp.pack_weight(random_rows(qtype, 16, k, torch.Generator().manual_seed(0)), qtype, k)
    (qs, qh, sc, sg, d, dmin, tab), _ = lb._weight_args(w)
    wargs = dict(qs_ptr=qs, qh_ptr=qh, sc_ptr=sc, sg_ptr=sg, d_ptr=d, dmin_ptr=dmin, tab_ptr=tab,
                 s_qs=3, s_qh=3, s_sc=3, s_sg=3, s_d=3)  # fmt: skip
    x, xb, xh = torch.zeros(1, k), torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(1, k).half()
    for target, xg, fp16 in ((GPUTarget("cuda", 90, 64), xb, False), (T4, xh, True)):
        for bm in (1, 4):
            _compile(lb._lowbit_gemv_kernel,
                     dict(x_ptr=x, out_ptr=x, M=1, N=3, K=3, k_per_split=3, stride_xm=3,
                          stride_osplit=3, **wargs),
                     dict(QTYPE=int(qtype), BLOCK_M=bm, BLOCK_N=16, BLOCK_K=lb.BLOCK_K),
                     target, 4, 1)  # fmt: skip
        for m in (16, 512):
            cfg = lb.gemm_config(m, 4096)
            c = _compile(lb._lowbit_gemm_kernel,
                         dict(x_ptr=xg, out_ptr=x, xscale_ptr=x, M=3, N=3, K=3, k_per_split=3,
                              stride_xm=3, stride_osplit=3, **wargs),
                         dict(QTYPE=int(qtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_K=cfg["BLOCK_K"], GROUP_M=8, USE_FP16=fp16, F32_DOT=False),
                         target, cfg["num_warps"], cfg["num_stages"])  # fmt: skip
            assert not fp16 or c.metadata.shared <= T4_SMEM, c.metadata.shared
        _compile(lb._lowbit_rows_kernel,
                 dict(out_ptr=x, ids_ptr=torch.zeros(1, dtype=torch.int64), R=3, N=3, K=3,
                      stride_out=3, scale=1.0, **wargs),
                 dict(QTYPE=int(qtype), BLOCK_R=16, BLOCK_K=lb.BLOCK_K, GATHER=True), target, 4,
                 1)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("qtype", PLANE, ids=lambda t: t.name)
def test_plane_lowbit_kernels_compile_for_h100_and_t4(qtype):
    """The GEMV (preloaded, split, gated), the fused GEMM (bf16 on sm_90, fp16 on sm_75 within
    its shared memory) and the gather, with IQ4's PRMT code-book lookup and Q3_K's int64 words."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget

    from llcuda.kernels import quant_dequant as qd
    from llcuda.kernels import quant_matmul as qm
    from tests.kernels.test_compile_targets import T4, T4_SMEM, _compile

    k, n = 4096, 1024
    w = qp.pack_weight(random_rows(qtype, 16, k, torch.Generator().manual_seed(0)), qtype, k)
    (qs, qh, sc, mn, d, dmin), _ = qm._weight_args(w)
    wargs = {
        "qs_ptr": qs,
        "qh_ptr": qh,
        "sc_ptr": sc,
        "mn_ptr": mn,
        "d_ptr": d,
        "dmin_ptr": dmin,
        "s_qs": 1,
        "s_qh": 1,
        "s_sc": 1,
        "s_d": 1,
        "magic": 1,
    }
    ints = {"M": 3, "N": n, "n_groups": k // 32, "groups_per_split": 8, "stride_xm": k,
            "stride_osplit": 3}  # fmt: skip
    for target, sms, xdt, fp16 in ((GPUTarget("cuda", 90, 64), 132, torch.bfloat16, False),
                                   (T4, 40, torch.float16, True)):  # fmt: skip
        for m, gated in ((1, 0), (4, 0), (16, 0), (1, 2), (4, 1)):
            cfg = qm.gemv_config(int(qtype), m, n, k // 32, sms)  # int8 activations at m <= 4
            _compile(qm._quant_gemv_kernel,
                     {"x_ptr": torch.empty(1), "xq_ptr": torch.empty(1, dtype=torch.int32),
                      "xm_ptr": torch.empty(1), "out_ptr": torch.empty(1), **wargs, **ints},
                     {"GATED_OUT": gated, "QTYPE": int(qtype), "WPG": 4, "HAS_MIN": False,
                      "BLOCK_M": triton.next_power_of_2(m), "BLOCK_N": cfg["BLOCK_N"],
                      "BLOCK_G": cfg["BLOCK_G"], "NUM_STAGES": cfg["num_stages"],
                      "PRELOAD": cfg["PRELOAD"], "USE_ASM": True, "INT8_X": cfg["INT8_X"],
                      "XPRE": False, "PDL": False},
                     target, cfg["num_warps"], cfg["num_stages"])  # fmt: skip
        for m in (16, 512):
            cfg = qm.gemm_config(int(qtype), m, n, k // 32, sms)
            c = _compile(qm._quant_gemm_kernel,
                         {"x_ptr": torch.empty(1, dtype=xdt), "out_ptr": torch.empty(1),
                          "xscale_ptr": torch.empty(1), **wargs, **ints},
                         {"QTYPE": int(qtype), "WPG": 4, "BLOCK_M": cfg["BLOCK_M"],
                          "BLOCK_N": cfg["BLOCK_N"], "BLOCK_G": cfg["BLOCK_G"],
                          "GROUP_M": cfg["GROUP_M"], "USE_FP16": fp16, "USE_ASM": True},
                         target, cfg["num_warps"], cfg["num_stages"])  # fmt: skip
            assert not fp16 or c.metadata.shared <= T4_SMEM
        rows_args = {"out_ptr": torch.empty(1), "ids_ptr": torch.empty(1, dtype=torch.int64),
                     **wargs, "R": 5, "N": n, "n_groups": k // 32, "stride_out": k,
                     "scale": 2.5}  # fmt: skip
        _compile(qd._dequant_rows_kernel, rows_args,
                 {"QTYPE": int(qtype), "WPG": 4, "BLOCK_R": 16, "BLOCK_G": 32, "GATHER": True,
                  "PLANE_MAJOR": False, "USE_ASM": True}, target, 4, 1)  # fmt: skip
