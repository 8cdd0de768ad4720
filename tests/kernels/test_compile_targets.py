"""The kernels of the T4 path (sm_75: no bf16, 64 KiB of shared memory per block) compile for
sm_75 and fit its shared memory, checked without a GPU: Triton compiles for a named target with
the ptxas it ships. Skipped where triton is not installed (the CPU-only CI)."""

from __future__ import annotations

import inspect
import itertools
import re

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.kernels import quant_pack as qp
from tests.kernels.test_quant_matmul import random_rows

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

T4 = GPUTarget("cuda", 75, 32)
T4_SMS, T4_SMEM = 40, 64 * 1024
_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
          torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32",
          torch.int64: "*i64"}  # fmt: skip
# the decode GEMVs' Q8Rows pointers (q8_activations): int32 words, fp32 meta
Q8_PTRS = {"xq_ptr": torch.empty(1, dtype=torch.int32), "xm_ptr": torch.empty(1)}
SHAPES = [  # (type, K, N) of Gemma 3 270M / 1B Q4_K_M files
    (GGMLType.Q5_0, 1152, 1536), (GGMLType.Q4_K, 6912, 1152), (GGMLType.Q6_K, 6912, 1152),
    (GGMLType.Q8_0, 1152, 262144), (GGMLType.Q4_K, 1024, 640), (GGMLType.F16, 640, 1024),
    (GGMLType.F32, 640, 1024),
]


def _compile(kernel, args: dict, constexprs: dict, target, num_warps: int, num_stages: int):
    """Compile as the launcher would: pointers, and integers that are multiples of 16 (unless the
    kernel opts out), are marked 16-divisible, which is what lets Triton vectorize loads."""
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            if (isinstance(value, int) and value % 16 == 0
                    and name not in (kernel.do_not_specialize or ())):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps,
                                                       "num_stages": num_stages})


def compile_ptx(kernel, args: dict, constexprs: dict, target, num_warps: int,
                num_stages: int = 1) -> str:
    """The PTX of `kernel` for `target` (scripts/kernel_ptx.py diffs it across checkouts)."""
    return _compile(kernel, args, constexprs, target, num_warps, num_stages).asm["ptx"]


def compile_for_t4(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int = 1):
    """Compile `kernel` for sm_75 and check it fits the T4's shared memory; `args` maps each
    runtime parameter to a tensor (its pointer type), an int or a float."""
    compiled = _compile(kernel, args, constexprs, T4, num_warps, num_stages)
    assert compiled.metadata.shared <= T4_SMEM, (kernel.fn.__name__, constexprs,
                                                 compiled.metadata.shared)
    return compiled


def _packed(qtype, k, n):
    gen = torch.Generator().manual_seed(0)
    return qp.pack_weight(random_rows(qtype, min(n, 64), k, gen), qtype, k)


def _weight_args(w) -> dict:
    from llcuda.kernels.quant_matmul import _weight_args

    (qs, qh, sc, mn, d, dmin), (s_qs, s_qh, s_sc, s_d) = _weight_args(w)
    return {"qs_ptr": qs, "qh_ptr": qh, "sc_ptr": sc, "mn_ptr": mn, "d_ptr": d, "dmin_ptr": dmin,
            "s_qs": 1, "s_qh": 1, "s_sc": 1, "s_d": 1, "magic": 1}  # fmt: skip


@pytest.mark.parametrize("qtype,k,n", SHAPES, ids=lambda v: getattr(v, "name", str(v)))
def test_quant_matmuls_compile_for_t4(qtype, k, n):
    from llcuda.kernels import quant_matmul as qm

    w = _packed(qtype, k, n)
    wpg = qm._WPG[int(qtype)]
    ints = {"M": 3, "N": n, "n_groups": k // 32, "groups_per_split": 8, "stride_xm": k,
            "stride_osplit": 3}  # fmt: skip
    # the fp32 GEMV (decode), and at one and four rows with the GEGLU epilogue of gate|up
    # and SwiGLU (GATED_OUT 1 / 2)
    # and the same with int8 activations (INT8_X: IDP4A is sm_61+)
    int8 = (False, True) if int(qtype) in qm.INT8_X_TYPES else (False,)
    for (m, gated), int8_x in itertools.product(
            ((1, 0), (4, 0), (16, 0), (1, 1), (4, 1), (1, 2), (4, 2)), int8):
        cfg = qm.gemv_config(int(qtype), m, n, k // 32, T4_SMS)
        args = {"x_ptr": torch.empty(1), **Q8_PTRS, "out_ptr": torch.empty(1), **_weight_args(w),
                **ints}  # fmt: skip
        compile_for_t4(qm._quant_gemv_kernel, args, {
            "GATED_OUT": gated, "QTYPE": int(qtype), "WPG": wpg,
            "HAS_MIN": int(qtype) in qm._HAS_MIN, "BLOCK_M": triton.next_power_of_2(m),
            "BLOCK_N": cfg["BLOCK_N"],
            "BLOCK_G": cfg["BLOCK_G"], "NUM_STAGES": cfg["num_stages"],
            "PRELOAD": cfg["PRELOAD"], "USE_ASM": True, "INT8_X": int8_x, "XPRE": int8_x,
            "PDL": False,
        }, cfg["num_warps"])  # fmt: skip
    for m in (16, 64, 512):  # the fp16 tensor-core GEMM: every batch past the GEMV on sm_75
        assert qm.matmul_path(m, n, k, bf16=False) in ("gemv", "gemm")
        cfg = qm.gemm_config(int(qtype), m, n, k // 32, T4_SMS)
        args = {"x_ptr": torch.empty(1, dtype=torch.float16), "out_ptr": torch.empty(1),
                "xscale_ptr": torch.empty(1), **_weight_args(w), **ints}  # fmt: skip
        compile_for_t4(qm._quant_gemm_kernel, args, {
            "QTYPE": int(qtype), "WPG": wpg, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
            "BLOCK_G": cfg["BLOCK_G"], "GROUP_M": cfg["GROUP_M"], "USE_FP16": True,
            "USE_ASM": True,
        }, cfg["num_warps"], cfg["num_stages"])  # fmt: skip


def test_embedding_gather_compiles_for_t4():
    from llcuda.kernels import quant_dequant as qd

    w = _packed(GGMLType.Q8_0, 640, 262144)
    args = {"out_ptr": torch.empty(1), "ids_ptr": torch.empty(1, dtype=torch.int64),
            **_weight_args(w), "R": 5, "N": 262144, "n_groups": 20, "stride_out": 640,
            "scale": 25.3}  # fmt: skip
    compile_for_t4(qd._dequant_rows_kernel, args, {
        "QTYPE": int(GGMLType.Q8_0), "WPG": 8, "BLOCK_R": 16, "BLOCK_G": 16, "GATHER": True,
        "PLANE_MAJOR": False, "USE_ASM": True}, 4)  # fmt: skip


def test_gemv_pair_compiles_for_t4_and_waits_first_on_sm90():
    """The q|k + v launch (two quant types in one kernel): sm_75, and on sm_90 with PDL each half
    waits for the previous grid itself, with no memory access before its wait but, with PRELOAD,
    its weight loads."""
    from llcuda.kernels import quant_matmul as qm

    k = 1152
    wa, wb = _packed(GGMLType.Q5_0, k, 1280), _packed(GGMLType.Q8_0, k, 256)
    ptrs = {w: {f"{name[:-4]}_{w}": t for name, t in _weight_args(weight).items()
                if name.endswith("_ptr")} for w, weight in (("a", wa), ("b", wb))}
    args = {"x_ptr": torch.empty(1), **Q8_PTRS, "out_ptr": torch.empty(1), **ptrs["a"], **ptrs["b"],
            "M": 1, "n_a": 1280, "n_b": 256, "n_groups": k // 32, "tiles_a": 40, "stride_xm": k,
            **{f"{name}_{w}": 7 for name in ("s_qs", "s_qh", "s_sc", "s_d") for w in "ab"},
            "magic": 0x4B000000}  # fmt: skip
    constexprs = {"QTYPE_A": int(GGMLType.Q5_0), "WPG_A": 4, "HAS_MIN_A": False, "BLOCK_N_A": 32,
                  "BLOCK_G_A": 4, "QTYPE_B": int(GGMLType.Q8_0), "WPG_B": 8, "HAS_MIN_B": False,
                  "BLOCK_N_B": 16, "BLOCK_G_B": 4, "BLOCK_M": 1, "NUM_STAGES": 3,
                  "USE_ASM": True, "INT8_X": False, "XPRE": False}  # fmt: skip
    compile_for_t4(qm._quant_gemv_pair_kernel, args,
                   {**constexprs, "PRELOAD": True, "PDL": False}, 4, 3)  # fmt: skip
    for preload, (int8_x, xpre) in itertools.product(
            (False, True), ((False, False), (True, False), (True, True))):
        ptx = compile_ptx(qm._quant_gemv_pair_kernel, args,
                          {**constexprs, "PRELOAD": preload, "PDL": True, "INT8_X": int8_x,
                           "XPRE": xpre}, H100, 4, 3)  # fmt: skip
        for head in _before_waits(ptx, 2):
            assert "st.global" not in head and "cp.async" not in head
            assert ("ld.global" in head) == preload


def test_argmax_compiles_for_t4():
    from llcuda.kernels import argmax as am

    i32 = torch.empty(1, dtype=torch.int32)
    args = {"x_ptr": torch.empty(1), "out_ptr": torch.empty(1, dtype=torch.int64),
            "piece_val_ptr": torch.empty(1), "piece_idx_ptr": i32, "counter_ptr": i32,
            "n": 262144, "stride_row": 262144}  # fmt: skip
    compile_for_t4(am._argmax_kernel, args, {"PIECES": 64, "BLOCK": am.BLOCK}, 4)


@pytest.mark.parametrize("max_query_len,sliding,softcap", [(1, 0, 0.0), (1, 512, 0.0),
                                                            (512, 0, 0.0), (512, 512, 0.0),
                                                            (1, 512, 50.0), (512, 0, 50.0)])
def test_paged_attention_compiles_for_t4_fp16_cache(monkeypatch, max_query_len, sliding,
                                                    softcap):  # fmt: skip
    from llcuda.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "_limits", lambda device: (T4_SMS, T4_SMEM))
    group, head_dim = 4, 256  # Gemma 3 270M / 1B: 4 query heads per KV head of 256
    cfg = pa.pick_config(group, head_dim, max_query_len, 2048, 8, 1, sliding,
                         torch.device("cpu"), elem_size=2)
    f32, i32 = torch.empty(1), torch.empty(1, dtype=torch.int32)
    cache = torch.empty(1, dtype=torch.float16)
    args = {"q_ptr": f32, "k_cache_ptr": cache, "v_cache_ptr": cache, "out_ptr": f32,
            "seg_out_ptr": f32, "seg_lse_ptr": f32, "counter_ptr": i32, "query_start_loc_ptr": i32,
            "seq_lens_ptr": i32, "block_tables_ptr": i32, "num_seqs": 8, "num_heads": 4,
            "sliding_window": sliding}  # fmt: skip
    args.update({name: 7 for name in inspect.signature(pa._paged_attention_kernel.fn).parameters
                 if name.startswith("stride_")})
    compile_for_t4(pa._paged_attention_kernel, args, {
        "HEAD_DIM": head_dim, "HEAD_DIM_P": head_dim, "GROUP": group,
        "BLOCK_Q": max(1, cfg.block_m // group), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
        "BLOCK_SIZE": 16, "SLIDING": sliding > 0, "NUM_SEGMENTS": cfg.num_segments,
        "ONE_QUERY_EACH": max_query_len == 1, "SOFTCAP": softcap, "PDL": False,
    }, cfg.num_warps, cfg.num_stages)  # fmt: skip


# Gemma 3's variant of the q/k norm + RoPE + KV-store kernel (the flags' defaults in its wrapper)
GEMMA3_ROPE_FLAGS = {"HAS_QK_NORM": True, "ROPE_NEOX": True, "HAS_BIAS": False}


def _store_args(cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    from llcuda.kernels import fused_norm as fn

    f32, i64 = torch.empty(1), torch.empty(1, dtype=torch.int64)
    store = {"qk_ptr": f32, "v_ptr": f32, "q_w_ptr": f32, "k_w_ptr": f32, "bias_ptr": f32,
             "cos_ptr": f32, "sin_ptr": f32, "pos_ptr": i64, "slot_ptr": i64, "q_out_ptr": f32,
             "k_cache_ptr": cache, "v_cache_ptr": cache, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "head_dim": head_dim, "half": head_dim // 2,
             "eps": 1e-6, "scale": head_dim**-0.5}  # fmt: skip
    store.update({name: (num_heads + 2 * num_kv_heads) * head_dim for name in inspect.signature(
        fn._qk_norm_rope_store_kv_kernel.fn).parameters if "stride" in name})
    return store


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 32, 4), (96, 32, 32),
                                                             (128, 28, 4), (256, 8, 1)])
def test_qk_rope_store_kv_flag_variants_compile(head_dim, num_heads, num_kv_heads):
    """Every variant of the q/k (norm) + RoPE + KV-store kernel (q/k norm on or off, NEOX or NORM
    RoPE, q|k|v bias on or off) for the head sizes of the supported architectures: on sm_90 with
    PDL it touches no memory before its wait; for sm_75 (fp16 cache) it compiles and fits."""
    from llcuda.kernels import fused_norm as fn

    half = triton.next_power_of_2(head_dim // 2)
    for norm, neox, bias in [(a, b, c) for a in (True, False) for b in (True, False)
                             for c in (True, False)]:  # fmt: skip
        flags = {"QK_SPLITS": 2, "V_SPLITS": 1, "BLOCK_SIZE": 16, "HALF": half,
                 "ROPE_FINE": 256, "HAS_QK_NORM": norm, "ROPE_NEOX": neox, "HAS_BIAS": bias}
        args = _store_args(torch.empty(1).bfloat16(), num_heads, num_kv_heads, head_dim)
        ptx = compile_ptx(fn._qk_norm_rope_store_kv_kernel, args, {**flags, "PDL": True}, H100,
                          4, 2)  # fmt: skip
        head = _before_wait(ptx)
        assert "ld.global" not in head and "st.global" not in head, flags
        args = _store_args(torch.empty(1).half(), num_heads, num_kv_heads, head_dim)
        compile_for_t4(fn._qk_norm_rope_store_kv_kernel, args, {**flags, "PDL": False}, 4)


def test_norm_rope_kv_store_geglu_and_softcap_compile_for_t4():
    from llcuda.kernels import fused_norm as fn

    f32, i64, f16 = torch.empty(1), torch.empty(1, dtype=torch.int64), torch.empty(1).half()
    eps = {"eps": 1e-6}
    q8 = {"q_words_ptr": torch.empty(1, dtype=torch.int32), "q_meta_ptr": f32}
    for q8_out in (False, True):  # and writing the Q8Rows of the int8 decode GEMVs
        compile_for_t4(fn._rms_norm_kernel, {"x_ptr": f32, "w_ptr": f32, "out_ptr": f32, **q8,
                                             "n": 1152, **eps},
                       {"BLOCK": 2048, "Q8_OUT": q8_out, "PDL": False}, 4)  # fmt: skip
        compile_for_t4(fn._residual_rms_norm_kernel, {
            "x_ptr": f32, "a_ptr": f32, "w_post_ptr": f32, "w_next_ptr": f32, "x_out_ptr": f32,
            "h_out_ptr": f32, **q8, "n": 1152, **eps, "split_stride": 9},
            {"SPLITS": 16, "BLOCK": 2048, "HAS_POST": True, "Q8_OUT": q8_out, "PDL": False}, 4)
    store = {"qk_ptr": f32, "v_ptr": f32, "q_w_ptr": f32, "k_w_ptr": f32, "bias_ptr": f32,
             "cos_ptr": f32, "sin_ptr": f32, "pos_ptr": i64, "slot_ptr": i64, "q_out_ptr": f32,
             "k_cache_ptr": f16, "v_cache_ptr": f16, "num_heads": 4, "num_kv_heads": 1,
             "head_dim": 256, "half": 128, **eps, "scale": 0.0625}  # fmt: skip
    store.update({name: 1536 for name in inspect.signature(
        fn._qk_norm_rope_store_kv_kernel.fn).parameters if "stride" in name})
    compile_for_t4(fn._qk_norm_rope_store_kv_kernel, store,
                   {"QK_SPLITS": 3, "V_SPLITS": 3, "BLOCK_SIZE": 16, "HALF": 128, "ROPE_FINE": 256,
                    **GEMMA3_ROPE_FLAGS, "PDL": False}, 4)
    for silu in (False, True):
        compile_for_t4(fn._gated_act_kernel, {"gu_ptr": f32, "out_ptr": f32, "f": 6912,
                                              "split_stride": 13824},
                       {"SPLITS": 2, "BLOCK": 1024, "SILU": silu, "PDL": False}, 4)
    compile_for_t4(fn._softcap_kernel, {"x_ptr": f32, "n": 262144, "cap": 30.0},
                   {"BLOCK": 4096, "PDL": False}, 4)



H100 = GPUTarget("cuda", 90, 32)


def _before_wait(ptx: str) -> str:
    """The PTX up to the grid-dependency wait, which must come exactly once."""
    return _before_waits(ptx, 1)[0]


def _before_waits(ptx: str, count: int) -> list[str]:
    """Per grid-dependency wait (there must be `count`), the PTX of its basic block before it:
    from the previous label or wait (the code that runs on the way to it)."""
    assert ptx.count("griddepcontrol.wait") == count
    assert "griddepcontrol.launch_dependents" in ptx
    heads, start = [], 0
    for _ in range(count):
        at = ptx.index("griddepcontrol.wait", start)
        block = ptx[start:at]
        labels = list(re.finditer(r"^\$L__BB\d+_\d+:", block, flags=re.M))
        heads.append(block[labels[-1].end():] if labels and start else block)
        start = at + len("griddepcontrol.wait")
    return heads


@pytest.mark.parametrize("int8_x", [False, True], ids=["fp32-x", "int8-x"])
@pytest.mark.parametrize("preload", [False, True], ids=["after-wait", "preload"])
@pytest.mark.parametrize("k", [1152, 2048])
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K, GGMLType.Q8_0,
                                   GGMLType.F16], ids=lambda v: v.name)
def test_gemv_with_dependent_launch_compiles_for_sm90(qtype, k, preload, int8_x):
    """With PDL the decode GEMV assembles for sm_90 and keeps dependent_launch's rule: nothing
    before the wait but, with PRELOAD, the weight loads of its first K step. The compiler must not
    sink those past the wait (that would undo the overlap), and no store may come before it."""
    from llcuda.kernels import quant_matmul as qm

    if qtype in (GGMLType.Q4_K, GGMLType.Q6_K) and k % 256:
        pytest.skip(f"{qtype.name} rows need a multiple of 256 elements")
    if int8_x and int(qtype) not in qm.INT8_X_TYPES:
        pytest.skip(f"{qtype.name} has no int8-activation GEMV")
    n = 1024
    w = _packed(qtype, k, n)
    cfg = qm.gemv_config(int(qtype), 1, n, k // 32, 132)
    args = {"x_ptr": torch.empty(1), **Q8_PTRS, "out_ptr": torch.empty(1), **_weight_args(w),
            "M": 1, "N": n, "n_groups": k // 32, "groups_per_split": 8, "stride_xm": k,
            "stride_osplit": 3}  # fmt: skip
    ptx = compile_ptx(qm._quant_gemv_kernel, args, {
        "GATED_OUT": 0, "QTYPE": int(qtype), "WPG": qm._WPG[int(qtype)],
        "HAS_MIN": int(qtype) in qm._HAS_MIN, "BLOCK_M": 1, "BLOCK_N": cfg["BLOCK_N"],
        "BLOCK_G": cfg["BLOCK_G"], "NUM_STAGES": cfg["num_stages"], "PRELOAD": preload,
        "USE_ASM": True, "INT8_X": int8_x, "XPRE": int8_x, "PDL": True,
    }, H100, cfg["num_warps"], cfg["num_stages"])  # fmt: skip
    head = _before_wait(ptx)
    assert "st.global" not in head and "cp.async" not in head
    assert ("ld.global" in head) == preload


def test_small_kernels_with_dependent_launch_wait_before_any_memory_access():
    from llcuda.kernels import fused_norm as fn
    from llcuda.kernels import paged_attention as pa

    f32, i32, bf16 = torch.empty(1), torch.empty(1, dtype=torch.int32), torch.empty(1).bfloat16()
    norm = {"x_ptr": f32, "a_ptr": f32, "w_post_ptr": f32, "w_next_ptr": f32, "x_out_ptr": f32,
            "h_out_ptr": f32, "q_words_ptr": i32, "q_meta_ptr": f32, "n": 1152, "eps": 1e-6,
            "split_stride": 9}  # fmt: skip
    store = _store_args(bf16, 4, 1, 256)
    attention = {"q_ptr": f32, "k_cache_ptr": bf16, "v_cache_ptr": bf16, "out_ptr": f32,
                 "seg_out_ptr": f32, "seg_lse_ptr": f32, "counter_ptr": i32,
                 "query_start_loc_ptr": i32, "seq_lens_ptr": i32, "block_tables_ptr": i32,
                 "num_seqs": 1, "num_heads": 4, "sliding_window": 512}  # fmt: skip
    attention.update({name: 7 for name in inspect.signature(
        pa._paged_attention_kernel.fn).parameters if name.startswith("stride_")})
    for kernel, args, constexprs in [
        (fn._residual_rms_norm_kernel, norm, {"SPLITS": 4, "BLOCK": 2048, "HAS_POST": True,
                                              "Q8_OUT": False}),
        (fn._residual_rms_norm_kernel, norm, {"SPLITS": 4, "BLOCK": 4096, "HAS_POST": False,
                                              "Q8_OUT": True}),
        (fn._qk_norm_rope_store_kv_kernel, store,
         {"QK_SPLITS": 1, "V_SPLITS": 1, "BLOCK_SIZE": 16, "HALF": 128, "ROPE_FINE": 256,
          **GEMMA3_ROPE_FLAGS}),
        (pa._paged_attention_kernel, attention,
         {"HEAD_DIM": 256, "HEAD_DIM_P": 256, "GROUP": 4, "BLOCK_Q": 4, "BLOCK_M": 16,
          "BLOCK_N": 64, "BLOCK_SIZE": 16, "SLIDING": True, "NUM_SEGMENTS": 8,
          "ONE_QUERY_EACH": True, "SOFTCAP": 0.0}),
        (pa._paged_attention_kernel, attention,  # Gemma 2 2B: 8 heads of 256 on 4 KV heads
         {"HEAD_DIM": 256, "HEAD_DIM_P": 256, "GROUP": 2, "BLOCK_Q": 8, "BLOCK_M": 16,
          "BLOCK_N": 64, "BLOCK_SIZE": 16, "SLIDING": True, "NUM_SEGMENTS": 8,
          "ONE_QUERY_EACH": True, "SOFTCAP": 50.0}),
    ]:  # fmt: skip
        head = _before_wait(compile_ptx(kernel, args, {**constexprs, "PDL": True}, H100, 4, 2))
        assert "ld.global" not in head and "st.global" not in head, kernel.fn.__name__


def test_dense_gemm_compiles_for_sm90_with_wgmma():
    """The dense path's bf16 GEMM (quant_tc.dense_gemm, in place of cuBLAS) with each tile
    dense_config picks for Gemma 3 1B / 270M prefills: on sm_90 its dots are asynchronous wgmma,
    and its shared memory stays within the 99 KiB per block of sm_86 / sm_89 (on sm_90 too: two
    blocks per SM). sm_75 never takes the dense path (no bf16: matmul_path sends it to the fused
    fp16 kernel)."""
    from llcuda.kernels import quant_tc as tc

    bf16 = torch.empty(1, dtype=torch.bfloat16)
    args = {"a_ptr": bf16, "b_ptr": bf16, "c_ptr": torch.empty(1), "M": 513, "N": 1152,
            "K": 1152, "K_PER_SPLIT": 1152, "stride_am": 1152, "stride_bn": 1152,
            "stride_cm": 1152, "stride_cs": 513 * 1152}  # fmt: skip
    configs = {}
    for n, k in ((1536, 1152), (13824, 1152), (1152, 6912), (1280, 640), (640, 2048)):
        for m in (32, 128, 512, 2048):
            for partials in (False, True):
                cfg = tc.dense_config(m, n, k, partials=partials)
                # SPLIT_K changes the grid, not the compiled kernel
                configs[tuple(sorted((key, v) for key, v in cfg.items() if key != "SPLIT_K"))] = cfg
    assert len(configs) > 1
    assert tc.dense_config(512, 1152, 6912)["SPLIT_K"] > 1  # the tall-K product splits K
    for cfg, even_k in [(c, True) for c in configs.values()] + [(tc.dense_config(512, 13824, 96),
                                                                 False)]:  # fmt: skip
        constexprs = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                      "BLOCK_K": cfg["BLOCK_K"], "GROUP_M": cfg["GROUP_M"], "EVEN_K": even_k,
                      "F32_DOT": False}  # fmt: skip
        compiled = _compile(tc._dense_gemm_kernel, args, constexprs, H100, cfg["num_warps"],
                            cfg["num_stages"])
        assert "wgmma.mma_async" in compiled.asm["ptx"], cfg
        ampere = _compile(tc._dense_gemm_kernel, args, constexprs, GPUTarget("cuda", 86, 32),
                          cfg["num_warps"], cfg["num_stages"])
        assert max(compiled.metadata.shared, ampere.metadata.shared) <= 99 * 1024, cfg
