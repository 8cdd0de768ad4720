"""Quantized matmul kernels (llcuda.kernels.quant_matmul) next to cuBLAS on a dense bf16 copy.

    python benchmarks/bench_quant_matmul.py [--quick] [--sweep] [--m1-sweep] [--big-m1-sweep]
        [--small-m-sweep] [--only 'TYPE K N'] [--json out.jsonl]

Per (type, K, N, M): kernel time in us (median of CUDA-graph replays, so launch gaps are not
counted), GB/s of packed weight bytes at M=1 (the decode roofline: ~3.35 TB/s on H100 SXM),
TFLOP/s at M=512, and torch's `x_bf16 @ W_bf16.T` (cuBLAS) at the same M. Each call reads one of
several weight copies in turn, so small weights are not timed out of L2 (the `L2` column marks
shapes whose copies still fit in it). --sweep times other launch configurations of the biggest
shapes, to tune the heuristics in quant_matmul.gemv_config / gemm_config; --m1-sweep those of the
single-token GEMV over every Gemma 3 1B / 270M decode projection and LM head (on sm_90 the graph's
launches are PDL-chained, each waiting for the one before, as in a decode step; gate|up with its
GEGLU epilogue).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from llcuda.kernels import quant_pack as qp
from llcuda.kernels.quant_matmul import (
    GEMV_SHORT_ROW_GROUPS,
    INT8_X_TYPES,
    gemm_config,
    gemv_config,
    quant_gemm,
    quant_gemv,
)

T = {name: qid for qid, (_, _, name) in qp.QUANT_BLOCKS.items()}

# (type, K, N): Gemma 3 270M and 1B as their Q4_K_M files store them, then Llama-8B-sized FFNs
SHAPES = [
    ("Q5_0", 640, 1024), ("Q5_0", 640, 256), ("Q4_K", 1024, 640), ("Q5_0", 640, 2048),
    ("Q4_K", 2048, 640), ("Q6_K", 2048, 640), ("Q8_0", 640, 262144),
    ("Q5_0", 1152, 1024), ("Q5_0", 1152, 256), ("Q4_K", 1024, 1152), ("Q5_0", 1152, 6912),
    ("Q4_K", 6912, 1152), ("Q6_K", 6912, 1152), ("Q8_0", 1152, 6912), ("Q8_0", 1152, 262144),
    ("Q4_0", 4096, 14336), ("Q4_1", 4096, 14336), ("Q5_1", 4096, 14336),
    ("Q4_K", 4096, 14336), ("Q4_K", 14336, 4096), ("Q5_K", 4096, 14336), ("Q6_K", 4096, 14336),
    ("Q8_0", 4096, 14336), ("F16", 4096, 14336), ("BF16", 4096, 14336), ("F32", 4096, 4096),
]
QUICK = [("Q8_0", 1152, 262144), ("Q4_K", 6912, 1152), ("Q5_0", 1152, 6912),
         ("Q4_K", 4096, 14336), ("Q6_K", 4096, 14336)]
SWEEP = [("Q4_K", 4096, 14336), ("Q4_0", 4096, 14336), ("Q6_K", 4096, 14336)]
CROSSOVER = [("Q4_K", 4096, 14336), ("Q5_0", 1152, 6912), ("Q8_0", 1152, 262144)]
BATCHES = [1, 16, 512]
L2_BYTES = 50 * 2**20
TARGET_BYTES = 256 * 2**20  # weight copies per measurement: at least this much, 64 copies at most


def random_rows(qid: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random raw GGUF rows on the GPU with small finite f16 scales (never zeros: see METHOD.md)."""
    if qid in qp.FLOAT_TYPES:
        v = torch.randn((n, k), generator=gen, device="cuda") * 0.05
        return v.to(qp.FLOAT_TYPES[qid]).view(torch.uint8).reshape(n, -1)
    elems, bb, name = qp.QUANT_BLOCKS[qid]
    raw = torch.randint(0, 256, (n, k // elems, bb), generator=gen, device="cuda",
                        dtype=torch.uint8)
    offs = {"Q6_K": [208], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2]}
    for off in offs.get(name, [0]):
        s = torch.rand((n, k // elems, 1), generator=gen, device="cuda") * 0.02 + 0.002
        raw[..., off : off + 2] = s.half().view(torch.uint8)
    if name == "Q6_K":
        raw[..., 192:208] = torch.randint(1, 32, (n, k // elems, 16), generator=gen,
                                          device="cuda", dtype=torch.uint8)
    return raw.reshape(n, -1)


def weight_copies(qid: int, n: int, k: int, gen: torch.Generator) -> list:
    """Packed random [n, k] weights of type qid: enough copies (at most 64) that timing calls
    that take them in turn reads at least TARGET_BYTES, so small weights are not timed from L2."""
    ws = [qp.pack_weight(random_rows(qid, n, k, gen), qid, k)]
    copies = max(1, min(64, -(-TARGET_BYTES // ws[0].nbytes)))
    return ws + [qp.pack_weight(random_rows(qid, n, k, gen), qid, k) for _ in range(copies - 1)]


def time_calls(calls: list, reps: int = 15) -> float:
    """Median microseconds per call: all calls captured in one CUDA graph, replayed `reps` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles and autotunes outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def bench_shape(tname: str, k: int, n: int, batches, gen, both: bool = False) -> list[dict]:
    qid = T[tname]
    raw = random_rows(qid, n, k, gen)
    w0 = qp.pack_weight(raw, qid, k)
    copies = max(1, min(64, -(-TARGET_BYTES // w0.nbytes)))
    ws = [w0] + [qp.pack_weight(random_rows(qid, n, k, gen), qid, k) for _ in range(copies - 1)]
    dense_bytes = n * k * 2
    dcopies = max(1, min(64, -(-TARGET_BYTES // dense_bytes)))
    wd = [qp.dequantize_packed(w).to(torch.bfloat16) for w in ws[:dcopies]]
    rows = []
    for m in batches:
        x = torch.randn((m, k), generator=gen, device="cuda")
        xb = x.to(torch.bfloat16)
        row = {"type": tname, "K": k, "N": n, "M": m, "weight_bytes": w0.nbytes,
               "l2_resident": copies * w0.nbytes < 2 * L2_BYTES}
        if m <= 16 or both:
            row["gemv_us"] = time_calls([lambda w=w, x=x: quant_gemv(x, w) for w in ws])
        if m >= 16 or both:
            row["gemm_us"] = time_calls([lambda w=w, x=x: quant_gemm(x, w) for w in ws])
        row["cublas_bf16_us"] = time_calls([lambda d=d, xb=xb: xb @ d.T for d in wd])
        ours = min(row.get("gemv_us", 1e30), row.get("gemm_us", 1e30))
        row["GBps"] = w0.nbytes / ours / 1e3
        row["TFLOPs"] = 2 * m * n * k / ours / 1e6
        row["cublas_GBps"] = dense_bytes / row["cublas_bf16_us"] / 1e3
        row["cublas_TFLOPs"] = 2 * m * n * k / row["cublas_bf16_us"] / 1e6
        rows.append(row)
    del ws, wd
    torch.cuda.empty_cache()
    return rows


def sweep_shape(tname: str, k: int, n: int, gen) -> list[dict]:
    """Time other launch configurations of one shape at M=1 (GEMV) and M=512 (GEMM)."""
    qid = T[tname]
    ws = weight_copies(qid, n, k, gen)
    w0 = ws[0]
    out = []
    x1 = torch.randn((1, k), generator=gen, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base = gemv_config(qid, 1, n, k // 32, sms)
    bgs = sorted({base["BLOCK_G"], 2 * base["BLOCK_G"]})
    for bn in (64, 128):
        for warps in (4, 8):
            for bg in bgs:
                for split in sorted({base["SPLIT_K"], 1}):
                    cfg = dict(base, BLOCK_N=bn, num_warps=warps, BLOCK_G=bg, SPLIT_K=split)
                    try:
                        calls = [lambda w=w, c=cfg: quant_gemv(x1, w, config=c) for w in ws]
                        us = time_calls(calls)
                    except Exception as e:  # a config the compiler rejects (e.g. out of registers)
                        print(f"  gemv {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
                        continue
                    out.append({"type": tname, "K": k, "N": n, "M": 1, "cfg": cfg, "us": us,
                                "GBps": w0.nbytes / us / 1e3, "default": cfg == base})
    x = torch.randn((512, k), generator=gen, device="cuda")
    gbase = gemm_config(qid, 512, n, k // 32)
    for bm, bn, warps, stages in [(128, 256, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
                                  (64, 256, 8, 2), (64, 128, 4, 2), (128, 128, 4, 2)]:
        cfg = dict(gbase, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            us = time_calls([lambda w=w, c=cfg, x=x: quant_gemm(x, w, config=c) for w in ws[:4]],
                            reps=10)
        except Exception as e:
            print(f"  gemm {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
            continue
        out.append({"type": tname, "K": k, "N": n, "M": 512, "cfg": cfg, "us": us,
                    "TFLOPs": 2 * 512 * n * k / us / 1e6, "default": cfg == gbase})
    return out


# (type, K, N) of the Gemma 3 1B / 270M twins' single-token projections: q|k|v (or q|k and v),
# o, gate|up, ffn_down (Q4_K or Q6_K), the tied LM heads
M1_SWEEP = [("Q5_0", 1152, 1536), ("Q8_0", 1152, 256), ("Q4_K", 1024, 1152),
            ("Q5_0", 1152, 13824), ("Q4_K", 6912, 1152), ("Q6_K", 6912, 1152),
            ("Q5_0", 640, 1536), ("Q4_K", 1024, 640), ("Q5_0", 640, 4096), ("Q4_K", 2048, 640),
            ("Q8_0", 1152, 262144), ("Q8_0", 640, 262144)]
GATE_UP = {("Q5_0", 1152, 13824), ("Q5_0", 640, 4096)}


def time_gemv(x: torch.Tensor, ws: list, config: dict | None, act: str | None) -> float:
    """us per single-token GEMV (gated_act `act`) over the weight copies `ws`, in one graph."""
    return time_calls([lambda w=w: quant_gemv(x, w, config=config, gated_act=act) for w in ws])


def time_candidates(tname: str, x: torch.Tensor, ws: list, configs: list[dict],
                    act: str | None) -> list[tuple[float, dict]]:
    """(us, config) per config, in the given order; a config that fails to compile or launch
    (e.g. out of registers or shared memory) is reported and left out."""
    results = []
    for cfg in configs:
        try:
            results.append((time_gemv(x, ws, cfg, act), cfg))
        except Exception as e:
            print(f"  {tname} {_short(cfg)}: failed {type(e).__name__}")
    return results


def m1_candidates(qid: int, k: int, n: int, sms: int) -> list[dict]:
    """Launch configs of the M=1 GEMV to time for one shape: the tiles from before PRELOAD with
    the loads after the PDL wait and before it; one whole-row K step, preloaded, at several rows
    per program and warps; split rows also at other splits and tile heights."""
    n_groups = k // 32
    before = gemv_config(qid, 1, n, n_groups, sms, preload=False)
    out = [before, dict(before, PRELOAD=True)]
    if n > 100_000:  # an LM head: bandwidth-bound, its sweep is the earlier one
        return out
    whole = 1 << (n_groups - 1).bit_length()
    for bn in (4, 8, 16, 32) if n_groups <= GEMV_SHORT_ROW_GROUPS else (4, 8, 16):
        for warps in (4, 8):
            out.append(dict(before, BLOCK_N=bn, BLOCK_G=whole, SPLIT_K=1, num_warps=warps,
                            PRELOAD=True))
    if n_groups <= GEMV_SHORT_ROW_GROUPS and n > 4096:  # wide: bigger tiles share x loads
        for bn in (64, 128):
            out.append(dict(before, BLOCK_N=bn, BLOCK_G=whole, SPLIT_K=1, num_warps=16,
                            PRELOAD=True))
    if n_groups <= GEMV_SHORT_ROW_GROUPS:
        return out
    for bn in (32, 64):
        for split in (before["SPLIT_K"], 2 * before["SPLIT_K"]):
            if n_groups // before["BLOCK_G"] >= split:
                out.append(dict(before, BLOCK_N=bn, SPLIT_K=split, PRELOAD=True))
    return out


def _m1_sweep_weights(gen, only: str | None):
    """(type name, K, N, type id, weight copies) per M1_SWEEP shape whose 'type K N' contains
    `only` (every one without it)."""
    for tname, k, n in M1_SWEEP:
        if only and only not in f"{tname} {k} {n}":
            continue
        yield tname, k, n, T[tname], weight_copies(T[tname], n, k, gen)


def m1_sweep(gen, only: str | None = None) -> list[dict]:
    """The M=1 GEMV per M1_SWEEP shape in a PDL chain: the default config, the one from before
    PRELOAD, and the four fastest of m1_candidates."""
    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tname, k, n, qid, ws in _m1_sweep_weights(gen, only):
        w0 = ws[0]
        # gate|up stores GELU_tanh(gate) * up, as in a Gemma decode step
        geglu = (tname, k, n) in GATE_UP
        x = torch.randn((1, k), generator=gen, device="cuda")
        base = gemv_config(qid, 1, n, k // 32, sms)
        act = "gelu_tanh" if geglu else None
        base_us = time_gemv(x, ws, None, act)
        results = time_candidates(tname, x, ws, m1_candidates(qid, k, n, sms), act)
        before_us = results[0][0]
        results.sort(key=lambda r: r[0])
        best = " ".join(f"{us:.2f}({_short(c)})" for us, c in results[:4])
        print(f"m1-sweep {tname} K={k} N={n}{' GEGLU out' if geglu else ''} "
              f"{w0.nbytes / 1e6:.2f} MB: default {base_us:.2f}us "
              f"({w0.nbytes / base_us / 1e3:.0f} GB/s, {_short(base)}); before PRELOAD "
              f"{before_us:.2f}us; best {best}", flush=True)
        out.append({"type": tname, "K": k, "N": n, "M": 1, "default_us": base_us,
                    "before_us": before_us, "best_us": results[0][0], "best": results[0][1]})
    return out


# (type, K, N, gated act) of the single-token projections of 4B-8B models' Q4_K_M files: Gemma 3
# 4B, Llama-3.1-8B, Qwen2.5-7B (q|k fused, v apart in its own type; gate|up with its epilogue;
# ffn_down in Q4_K and, in the use_more_bits layers, Q6_K; the 8B's Q6_K head), then the 1B's
# biggest three, which must not get slower
BIG_M1_SWEEP = [
    ("Q4_K", 2560, 3072, None), ("Q6_K", 2560, 1024, None), ("Q4_K", 2048, 2560, None),
    ("Q4_K", 2560, 20480, "gelu_tanh"), ("Q4_K", 10240, 2560, None), ("Q6_K", 10240, 2560, None),
    ("Q4_K", 4096, 5120, None), ("Q6_K", 4096, 1024, None), ("Q4_K", 4096, 4096, None),
    ("Q4_K", 4096, 28672, "silu"), ("Q4_K", 14336, 4096, None), ("Q6_K", 14336, 4096, None),
    ("Q6_K", 4096, 128256, None),
    ("Q4_K", 3584, 4096, None), ("Q4_K", 3584, 37888, "silu"), ("Q4_K", 18944, 3584, None),
    ("Q5_0", 1152, 13824, "gelu_tanh"), ("Q4_K", 6912, 1152, None), ("Q8_0", 1152, 262144, None),
]


def big_candidates(base: dict, n_groups: int) -> list[dict]:
    """INT8_X configs to time beside the fp32 default: the default tiles, rows per program and
    warps around them, twice the K step, twice the splits, and whole-row preloaded tiles."""
    i8 = dict(base, INT8_X=True)
    out = [i8]
    if not base.get("PRELOAD"):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                out.append(dict(i8, BLOCK_N=bn, num_warps=warps))
        out.append(dict(i8, BLOCK_G=2 * base["BLOCK_G"]))
        out.append(dict(i8, BLOCK_G=2 * base["BLOCK_G"], num_warps=8))
        if base["SPLIT_K"] > 1:
            out.append(dict(i8, SPLIT_K=2 * base["SPLIT_K"]))
            out.append(dict(i8, SPLIT_K=max(1, base["SPLIT_K"] // 2)))
    if n_groups <= 256:
        whole = 1 << (n_groups - 1).bit_length()
        for bn in (8, 16, 32):
            out.append(dict(i8, BLOCK_N=bn, BLOCK_G=whole, SPLIT_K=1, num_warps=8, num_stages=1,
                            PRELOAD=True))
    return out


def big_m1_sweep(gen, only: str | None = None) -> list[dict]:
    """The M=1 GEMV of BIG_M1_SWEEP's shapes, PDL-chained: the fp32 default, then int8
    activations (INT8_X) at the default config and the candidates of big_candidates."""
    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tname, k, n, act in BIG_M1_SWEEP:
        if only and only not in f"{tname} {k} {n}":
            continue
        qid = T[tname]
        ws = weight_copies(qid, n, k, gen)
        x = torch.randn((1, k), generator=gen, device="cuda")
        base = gemv_config(qid, 1, n, k // 32, sms)
        fp32_us = time_gemv(x, ws, base, act)
        results = time_candidates(tname, x, ws, big_candidates(base, k // 32), act)
        i8_default = results[0][0]
        results.sort(key=lambda r: r[0])
        nbytes = ws[0].nbytes
        best = " ".join(f"{us:.1f}({_short(c)})" for us, c in results[:3])
        print(f"big-m1 {tname} K={k} N={n}{' ' + act if act else ''} {nbytes / 1e6:.1f} MB: "
              f"fp32 {fp32_us:.1f}us {nbytes / fp32_us / 1e3:.0f} GB/s ({_short(base)}); int8 "
              f"default {i8_default:.1f}us; best {results[0][0]:.1f}us "
              f"{nbytes / results[0][0] / 1e3:.0f} GB/s: {best}", flush=True)
        out.append({"type": tname, "K": k, "N": n, "act": act, "fp32_us": fp32_us,
                    "int8_default_us": i8_default, "best_us": results[0][0],
                    "best": results[0][1], "bytes": nbytes})
        del ws
        torch.cuda.empty_cache()
    return out


def _short(cfg: dict) -> str:
    return (f"rows {cfg['BLOCK_N']} groups {cfg['BLOCK_G']} warps {cfg['num_warps']} splits "
            f"{cfg['SPLIT_K']}{' preload' if cfg.get('PRELOAD') else ''}")


def small_m_candidates(qid: int, m: int, k: int, n: int, sms: int) -> list[dict]:
    """GEMV configs to time at a decode batch of m (2..4) rows: the default for m, the M=1
    tiles (preloaded whole rows where they apply), whole-row preloaded tiles of 4-32 rows at 4
    and 8 warps, and each of those with the other INT8_X setting."""
    n_groups = k // 32
    base = gemv_config(qid, m, n, n_groups, sms)
    out = [base, dict(gemv_config(qid, 1, n, n_groups, sms), INT8_X=base["INT8_X"])]
    if n_groups <= 256 and n <= 100_000:
        whole = 1 << (n_groups - 1).bit_length()
        for bn in (4, 8, 16, 32):
            for warps in (4, 8):
                out.append(dict(base, BLOCK_N=bn, BLOCK_G=whole, SPLIT_K=1, num_warps=warps,
                                num_stages=1, PRELOAD=True))
    if qid in INT8_X_TYPES:
        out += [dict(c, INT8_X=not c["INT8_X"]) for c in list(out)]
    return out


def small_m_sweep(gen, only: str | None = None, batches=(2, 3, 4)) -> list[dict]:
    """The decode GEMV of M1_SWEEP's shapes (the 1B / 270M projections) at batches of 2-4 rows,
    PDL-chained: the default config, the fused tensor-core GEMM at the same M, and the fastest
    of small_m_candidates, beside the default at M=1 (what a step of 1 costs)."""
    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tname, k, n, qid, ws in _m1_sweep_weights(gen, only):
        act = "gelu_tanh" if (tname, k, n) in GATE_UP else None
        m1_us = time_gemv(torch.randn((1, k), generator=gen, device="cuda"), ws, None, act)
        for m in batches:
            x = torch.randn((m, k), generator=gen, device="cuda")
            default_us = time_gemv(x, ws, None, act)
            gemm_us = time_calls([lambda w=w, x=x: quant_gemm(x, w) for w in ws])
            want = quant_gemv(x, ws[0], gated_act=act)
            candidates = []
            for cfg in small_m_candidates(qid, m, k, n, sms):  # a config must give the sums
                try:
                    got = quant_gemv(x, ws[0], config=cfg, gated_act=act)
                except Exception as e:
                    print(f"  {tname} M={m} {_short(cfg)}: failed {type(e).__name__}")
                    continue
                err = ((got - want).norm() / want.norm()).item()
                if err < 2e-2:  # int8 against fp32 activations differ by ~1e-3
                    candidates.append(cfg)
                else:
                    print(f"  {tname} M={m} {_short(cfg)}: WRONG, rel err {err:.2g}")
            results = time_candidates(tname, x, ws, candidates, act)
            results.sort(key=lambda r: r[0])
            best = " ".join(f"{us:.2f}({_short(c)}{' int8' if c['INT8_X'] else ''})"
                            for us, c in results[:3])
            print(f"small-m {tname} K={k} N={n}{' GEGLU out' if act else ''} M={m}: default "
                  f"{default_us:.2f}us (M=1 {m1_us:.2f}us), fused GEMM {gemm_us:.2f}us; best "
                  f"{best}", flush=True)
            out.append({"type": tname, "K": k, "N": n, "M": m, "m1_us": m1_us,
                        "default_us": default_us, "gemm_us": gemm_us,
                        "best_us": results[0][0] if results else None,
                        "best": results[0][1] if results else None})
    return out


# the 1B twin's projections as a decode batch meets them (q|k, gate|up fused; K=1152 is Q5_0)
DECODE_SWEEP = [("Q5_0", 1152, 13824), ("Q4_K", 6912, 1152), ("Q5_0", 1152, 1280)]


def decode_sweep(gen, batches=(64, 128)) -> list[dict]:
    """Tensor-core tile shapes, pipeline depth, K per step and warps at decode batch sizes."""
    import triton

    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tname, k, n in DECODE_SWEEP:
        qid = T[tname]
        ws = weight_copies(qid, n, k, gen)
        for m in batches:
            x = torch.randn((m, k), generator=gen, device="cuda")
            base = gemm_config(qid, m, n, k // 32, sms)
            results = []
            for bn in (32, 64, 128):
                for bg in (base["BLOCK_G"], 2 * base["BLOCK_G"]):
                    for stages in (2, 3):
                        for warps in (4, 8):
                            tiles = triton.cdiv(m, base["BLOCK_M"]) * triton.cdiv(n, bn)
                            split = 1
                            if tiles < sms:
                                split = max(1, min(triton.cdiv(2 * sms, tiles),
                                                   (k // 32) // (2 * bg)))
                            cfg = dict(base, BLOCK_N=bn, BLOCK_G=bg, num_stages=stages,
                                       num_warps=warps, SPLIT_K=split)
                            try:
                                us = time_calls([lambda w=w, c=cfg, x=x: quant_gemm(x, w, config=c)
                                                 for w in ws])
                            except Exception as e:
                                print(f"  {tname} M={m} {cfg}: failed {type(e).__name__}")
                                continue
                            results.append((us, cfg))
            base_us = time_calls([lambda w=w, x=x: quant_gemm(x, w) for w in ws])
            best_us, best = min(results, key=lambda r: r[0])
            print(f"decode-sweep {tname} K={k} N={n} M={m}: default {base_us:7.1f}us "
                  f"best {best_us:7.1f}us {best}", flush=True)
            for us, cfg in sorted(results, key=lambda r: r[0])[:4]:
                print(f"    {us:7.1f}us {cfg}")
            out.append({"type": tname, "K": k, "N": n, "M": m, "default_us": base_us,
                        "best_us": best_us, "best": best})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the five headline shapes")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs (slow)")
    ap.add_argument("--crossover", action="store_true",
                    help="time both paths at M = 2..16 to place GEMV_MAX_M")
    ap.add_argument("--no-table", action="store_true", help="skip the table (with --sweep)")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="only: tile configs of the 1B twin's projections at M = 64, 128")
    ap.add_argument("--m1-sweep", action="store_true",
                    help="only: GEMV configs of the 1B / 270M twins' decode projections at M = 1")
    ap.add_argument("--small-m-sweep", action="store_true",
                    help="only: GEMV configs of the 1B / 270M decode projections at M = 2..4")
    ap.add_argument("--big-m1-sweep", action="store_true",
                    help="only: fp32 vs int8-activation GEMV configs of 4B-8B decode projections")
    ap.add_argument("--only", default=None,
                    help="with a sweep: only shapes whose 'type K N' contains this")
    ap.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.decode_sweep:
        decode_sweep(gen)
        return
    if args.m1_sweep:
        m1_sweep(gen, args.only)
        return
    if args.big_m1_sweep or args.small_m_sweep:
        rows = big_m1_sweep(gen, args.only) if args.big_m1_sweep else small_m_sweep(gen, args.only)
        if args.json:
            with open(args.json, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        return
    rows = []
    for tname, k, n in [] if args.no_table else QUICK if args.quick else SHAPES:
        rows += bench_shape(tname, k, n, BATCHES, gen)
        for r in rows[-len(BATCHES):]:
            print(f"{r['type']:5} K={r['K']:6} N={r['N']:7} M={r['M']:4}  "
                  f"gemv {r.get('gemv_us', float('nan')):9.1f}us  "
                  f"gemm {r.get('gemm_us', float('nan')):9.1f}us  "
                  f"cublas {r['cublas_bf16_us']:9.1f}us  {r['GBps']:7.0f} GB/s  "
                  f"{r['TFLOPs']:6.1f} TF/s", flush=True)
    sweeps = []
    if args.sweep:
        for tname, k, n in SWEEP:
            sweeps += sweep_shape(tname, k, n, gen)
            for s in [s for s in sweeps if s["type"] == tname and s["K"] == k and s["N"] == n]:
                print(f"sweep {tname} K={k} N={n} M={s['M']} {s['us']:9.1f}us "
                      f"{s.get('GBps', 0):7.0f} GB/s {s.get('TFLOPs', 0):6.1f} TF/s "
                      f"{'*' if s['default'] else ' '} {s['cfg']}", flush=True)
    if args.crossover:
        for tname, k, n in CROSSOVER:
            for r in bench_shape(tname, k, n, [2, 4, 8, 16], gen, both=True):
                sweeps.append(dict(r, crossover=True))
                print(f"crossover {tname} K={k} N={n} M={r['M']:3} gemv {r['gemv_us']:8.1f}us "
                      f"gemm {r['gemm_us']:8.1f}us cublas {r['cublas_bf16_us']:8.1f}us", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows + sweeps:
                f.write(json.dumps(r) + "\n")

    print("\n| type | K | N | M | ours us | GB/s (M=1) | TFLOP/s | cuBLAS bf16 us | cuBLAS GB/s"
          " | cuBLAS TFLOP/s | L2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = min(r.get("gemv_us", 1e30), r.get("gemm_us", 1e30))
        path = "gemv" if ours == r.get("gemv_us") else "gemm"
        print(f"| {r['type']} | {r['K']} | {r['N']} | {r['M']} | {ours:.1f} ({path}) | "
              f"{r['GBps']:.0f} | {r['TFLOPs']:.2f} | {r['cublas_bf16_us']:.1f} | "
              f"{r['cublas_GBps']:.0f} | {r['cublas_TFLOPs']:.2f} | "
              f"{'yes' if r['l2_resident'] else ''} |")


if __name__ == "__main__":
    main()
