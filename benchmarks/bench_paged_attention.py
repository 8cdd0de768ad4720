"""Triton paged attention (llcuda.kernels.paged_attention) next to the pure-torch reference.

    python benchmarks/bench_paged_attention.py [--quick] [--sweep] [--json out.jsonl]

Gemma 3 shapes: 4 query heads, 1 KV head (GQA 4), head_dim 256, block_size 32, fp16 cache.
Decode: num_seqs x context, one query each; the kernel's time is the median of CUDA-graph replays
(as the engine runs decode) over several cache copies in turn, so small caches are not timed out of
L2; GB/s counts the K and V bytes the step must read (H100 SXM: ~3.35 TB/s peak). Prefill: whole
prompts, TFLOP/s counts the causal (or windowed) QK^T and PV products. The reference is timed
eagerly (it syncs on the host, so it cannot be graphed). --sweep times other tile shapes of a few
cases, to tune pick_config.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton

from llcuda.kernels.paged_attention import AttentionConfig, paged_attention, pick_config
from llcuda.kernels.reference import paged_attention_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 1, 256, 32
TARGET_BYTES = 256 * 2**20  # cache copies per decode measurement: at least this much, 64 at most


def make_inputs(num_seqs: int, ctx: int, num_q: int, copies: int, gen: torch.Generator) -> dict:
    """`copies` disjoint caches for the same batch shape (each copy has its own block tables)."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    per_copy = num_seqs * blocks_per_seq
    shape = (copies * per_copy, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    tables = [
        (torch.randperm(per_copy, generator=gen, device="cuda") + c * per_copy)
        .view(num_seqs, blocks_per_seq).to(torch.int32)
        for c in range(copies)
    ]
    q = torch.randn((num_seqs * num_q, NUM_HEADS, HEAD_DIM), generator=gen, device="cuda")
    q *= HEAD_DIM**-0.5
    qsl = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * num_q
    seq_lens = torch.full((num_seqs,), ctx, device="cuda", dtype=torch.int32)
    return {"q": q, "k": k_cache, "v": v_cache, "qsl": qsl, "seq_lens": seq_lens,
            "tables": tables, "num_q": num_q, "ctx": ctx}


def call(x: dict, table: torch.Tensor, window: int, config: AttentionConfig | None = None):
    return paged_attention(x["q"], x["k"], x["v"], x["qsl"], x["seq_lens"], table, window,
                           x["num_q"], x["ctx"], config=config)


def time_graph(x: dict, window: int, config: AttentionConfig | None, calls: int = 24) -> float:
    """Median microseconds per call over graph replays cycling through the cache copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for table in x["tables"]:
            call(x, table, window, config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(x, x["tables"][i % len(x["tables"])], window, config)
    graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def time_ref(x: dict, window: int) -> float:
    fn = lambda: paged_attention_ref(x["q"], x["k"], x["v"], x["qsl"], x["seq_lens"],  # noqa: E731
                                     x["tables"][0], window)
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1000


def max_err(x: dict, window: int, config: AttentionConfig | None) -> float:
    table = x["tables"][0]
    ref = paged_attention_ref(x["q"], x["k"], x["v"], x["qsl"], x["seq_lens"], table, window)
    return (call(x, table, window, config) - ref).abs().max().item()


def visible_keys(ctx: int, num_q: int, window: int) -> int:
    """Sum over queries of the keys each one sees (for FLOP counts)."""
    total = 0
    for p in range(ctx - num_q, ctx):
        total += min(p + 1, window) if window else p + 1
    return total


def bench_decode(num_seqs: int, ctx: int, window: int, gen, config=None, with_ref=True) -> dict:
    kv_len = min(ctx, window) if window else ctx
    kv_bytes = num_seqs * kv_len * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    full_bytes = num_seqs * ctx * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    copies = max(1, min(64, -(-TARGET_BYTES // full_bytes)))
    x = make_inputs(num_seqs, ctx, 1, copies, gen)
    cfg = config or pick_config(NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, 1, ctx, num_seqs,
                                NUM_KV_HEADS, window, x["q"].device)
    us = time_graph(x, window, config, calls=max(24, copies))
    row = {"mode": "decode", "num_seqs": num_seqs, "ctx": ctx, "window": window,
           "config": cfg.__dict__, "us": us, "GBps": kv_bytes / us / 1e3,
           "max_err": max_err(x, window, config)}
    if with_ref:
        row["ref_us"] = time_ref(x, window)
    del x
    return row


def bench_prefill(num_seqs: int, num_q: int, window: int, gen, config=None,
                  with_ref=True) -> dict:
    x = make_inputs(num_seqs, num_q, num_q, 1, gen)
    cfg = config or pick_config(NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, num_q, num_q, num_seqs,
                                NUM_KV_HEADS, window, x["q"].device)
    us = time_graph(x, window, config, calls=8)
    flops = 4 * num_seqs * visible_keys(num_q, num_q, window) * NUM_HEADS * HEAD_DIM
    row = {"mode": "prefill", "num_seqs": num_seqs, "ctx": num_q, "window": window,
           "config": cfg.__dict__, "us": us, "TFLOPs": flops / us / 1e6,
           "max_err": max_err(x, window, config)}
    if with_ref:
        row["ref_us"] = time_ref(x, window)
    del x
    return row


def fmt(row: dict) -> str:
    c = row["config"]
    cfg = (f"m{c['block_m']} n{c['block_n']} s{c['num_segments']} w{c['num_warps']} "
           f"st{c['num_stages']}")
    rate = f"{row['GBps']:7.0f} GB/s" if "GBps" in row else f"{row['TFLOPs']:7.1f} TF/s"
    ref = f"{row['ref_us']:10.1f}" if "ref_us" in row else " " * 10
    speedup = f"{row['ref_us'] / row['us']:7.1f}x" if "ref_us" in row else ""
    return (f"{row['mode']:8} {row['num_seqs']:5} {row['ctx']:6} {row['window']:5} "
            f"{row['us']:9.1f} {rate} {ref} {speedup:>8}  err {row['max_err']:.1e}  {cfg}")


HEADER = (f"{'mode':8} {'seqs':>5} {'ctx':>6} {'win':>5} {'us':>9} {'rate':>12} {'ref_us':>10} "
          f"{'speedup':>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    ap.add_argument("--sweep", action="store_true", help="also time other tile shapes")
    ap.add_argument("--json", help="append one JSON line per measurement to this file")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(torch.cuda.get_device_name(), f"triton {triton.__version__}",
          f"torch {torch.__version__}")
    print(HEADER)
    seqs = [1, 128] if args.quick else [1, 8, 64, 128]
    ctxs = [4096] if args.quick else [512, 2048, 4096]
    for num_seqs in seqs:
        for ctx in ctxs:
            for window in (0, 512) if ctx > 512 else (0,):
                rows.append(bench_decode(num_seqs, ctx, window, gen))
                print(fmt(rows[-1]), flush=True)
    for num_seqs, num_q, window in [(1, 512, 0), (4, 512, 0), (1, 2048, 0), (1, 2048, 512)]:
        rows.append(bench_prefill(num_seqs, num_q, window, gen))
        print(fmt(rows[-1]), flush=True)
    if args.sweep:
        print("\nsweep (reference not rerun)")
        for num_seqs, ctx in [(1, 4096), (8, 4096), (128, 4096)]:
            base = pick_config(NUM_HEADS, HEAD_DIM, 1, ctx, num_seqs, NUM_KV_HEADS, 0,
                               torch.device("cuda"))
            for bn, warps, stages, segs in [(32, 4, 3, None), (64, 4, 2, None), (32, 8, 2, None),
                                            (64, 8, 2, None), (32, 4, 2, 1), (32, 4, 2, 0)]:
                if segs == 0:
                    segs = base.num_segments * 2
                cfg = AttentionConfig(16, bn, segs or base.num_segments, warps, stages)
                rows.append(bench_decode(num_seqs, ctx, 0, gen, cfg, with_ref=False))
                print(fmt(rows[-1]), flush=True)
        for num_q in (512, 2048):
            for bm, bn, warps, stages in [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                                          (64, 32, 8, 3), (32, 32, 4, 2)]:
                cfg = AttentionConfig(bm, bn, 1, warps, stages)
                rows.append(bench_prefill(1, num_q, 0, gen, cfg, with_ref=False))
                print(fmt(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "paged_attention", "device":
                                    torch.cuda.get_device_name(), **row}) + "\n")


if __name__ == "__main__":
    main()
