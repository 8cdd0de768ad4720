"""Benchmark twins of Llama 3.2 1B / 3B, Llama 3.1 8B and Qwen2.5 7B in the tensor-type mix of a
llama-quantize file type (Q4_K_M by default; Q3_K_M, Q2_K, IQ4_XS, IQ2_XS: quant_mixes.py), with
random blocks (for speed measurements on the device; their output is noise).

The Q4_K_M mix is llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp): Q4_K by default;
Q6_K for attn_v and ffn_down on `use_more_bits` layers and for output.weight (or the token
embedding when it is tied); F32 for norms, biases and `rope_freqs`. For Llama 3.1 8B that is
193 Q4_K, 33 Q6_K and 66 F32 tensors, as in the real file. Metadata, tensor names and order come
from arch_spec (the converter's), the vocabulary from synthetic_vocab (real vocab sizes). Blocks
are random bytes with finite scale fields (synthetic._random_tensor), streamed one tensor at a
time, so an 8B twin (~4.9 GB) takes about as long as the disk needs.

    python -m llcuda.gguf.synthetic OUT.gguf --preset llama-3.1-8b [--mix Q3_K_M]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llcuda.gguf.arch_spec import ArchSpec, llama3_rope_factors, tensor_list
from llcuda.gguf.constants import GGMLType
from llcuda.gguf.quant_mixes import FILE_TYPES, mix_type
from llcuda.gguf.synthetic import _random_tensor, write_streamed
from llcuda.gguf.twins import twin_metadata

BENCH_PRESETS: dict[str, ArchSpec] = {
    "llama-3.2-1b": ArchSpec(
        "llama", n_embd=2048, n_layers=16, n_ff=8192, n_head=32, n_kv_head=8, head_dim=64,
        vocab_size=128256, context_length=131072, rope_theta=500000.0, tied=True,
        llama3_rope=(32.0, 1.0, 4.0, 8192), name="Synthetic Llama 3.2 1B",
    ),
    "llama-3.2-3b": ArchSpec(
        "llama", n_embd=3072, n_layers=28, n_ff=8192, n_head=24, n_kv_head=8, head_dim=128,
        vocab_size=128256, context_length=131072, rope_theta=500000.0, tied=True,
        llama3_rope=(32.0, 1.0, 4.0, 8192), name="Synthetic Llama 3.2 3B",
    ),
    "llama-3.1-8b": ArchSpec(
        "llama", n_embd=4096, n_layers=32, n_ff=14336, n_head=32, n_kv_head=8, head_dim=128,
        vocab_size=128256, context_length=131072, rope_theta=500000.0, tied=False,
        llama3_rope=(8.0, 1.0, 4.0, 8192), name="Synthetic Llama 3.1 8B",
    ),
    "qwen2.5-7b": ArchSpec(
        "qwen2", n_embd=3584, n_layers=28, n_ff=18944, n_head=28, n_kv_head=4, head_dim=128,
        vocab_size=152064, context_length=32768, rope_theta=1e6, rms_eps=1e-6, tied=False,
        tokenizer="qwen2", name="Synthetic Qwen2.5 7B",
    ),
}  # fmt: skip


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else 0


def bench_plan(spec: ArchSpec, mix: str = "Q4_K_M") -> list[tuple[str, tuple[int, ...], GGMLType]]:
    """(GGUF name, ne innermost-first, type) for every tensor, in file order."""
    plan = []
    n_gqa = spec.n_head // spec.n_kv_head
    for _, name, shape in tensor_list(spec):
        ne = tuple(reversed(shape))
        qtype = GGMLType.F32 if len(ne) == 1 else mix_type(
            mix, name, ne[0], _layer(name), spec.n_layers, n_gqa, spec.tied
        )  # fmt: skip
        plan.append((name, ne, qtype))
    return plan


def _data(rng: np.random.Generator, spec: ArchSpec, name: str, ne: tuple[int, ...], qtype):
    if name == "rope_freqs.weight":
        return llama3_rope_factors(spec)
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(ne[0])).astype(np.float32)
    return _random_tensor(rng, ne, qtype)


def write_bench_gguf(path: str | Path, preset: str, seed: int = 0, mix: str = "Q4_K_M") -> Path:
    """Write benchmark twin `preset` (a key of BENCH_PRESETS) in file type `mix`, streaming one
    tensor at a time."""
    if preset not in BENCH_PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(BENCH_PRESETS)})")
    spec = BENCH_PRESETS[preset]
    plan = bench_plan(spec, mix)
    rng = np.random.default_rng(seed)
    data = (_data(rng, spec, name, ne, qtype) for name, ne, qtype in plan)
    meta = twin_metadata(spec, file_type=FILE_TYPES[mix])
    return write_streamed(path, spec.arch, meta, plan, data)
