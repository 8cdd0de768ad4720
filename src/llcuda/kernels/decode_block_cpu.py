"""A decoder block's decode step on the CPU in one native call (csrc/decode_block.h).

`decode_block(block, x, h, positions, meta, cache)` returns what `DecoderBlock.__call__` returns
for a step of one new token per sequence, computed by the C++ extension: the q|k|v, o, gate|up
and down GEMVs of quant_cpu_native, and between them the per-head norms, RoPE, the KV store,
paged attention (GQA, sliding window, soft-cap), the gated activation and the sandwich norms,
on fp32 values as the reference ops compute them (only summation orders differ;
tests/unit/test_decode_block_cpu.py holds it to the reference path), except that by default
the GEMVs quantize their inputs to int8 first (quant_cpu_native.decode_int8: the GPU decode
GEMV's spec, q8_activations; LLCUDA_CPU_INT8=0 keeps them fp32). It returns None where it
does not apply (not a CPU decode step, the fast path off or unbuilt, a weight type it lacks, a
tensor-parallel block), and the caller runs the reference ops instead.

Why: a decode step of Gemma 3 270M on 2 cores spent ~12 ms a token between its matmuls, in
the ~40 small torch ops of each of the 18 blocks and in waking the matmul pool's workers again
for each GEMV; that is more than the 7.6 ms of its LM head. One call a block leaves 4 pool jobs
and a few vector loops (BENCHMARKS.md, CPU, thirteenth session).
"""

from __future__ import annotations

import torch

from llcuda.kernels import quant_cpu_native as qn
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.layers.linear import FusedQuantLinear, QuantLinear
from llcuda.layers.quant_tensor import QuantTensor

ACTIVATIONS = {"gelu_tanh": 0, "silu": 1}  # decode_block.h's Act

_UNSUPPORTED = object()  # a block the native path can't run: cached so it is checked once


def decode_block(
    block, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
    cache: KVCache,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """(x', h') of DecoderBlock.__call__ for a decode step (one token per sequence), or None.

    x, h: [num_tokens, hidden_size] fp32 (h = the norm of x the previous block made)."""
    if not (
        x.device.type == "cpu"
        and meta.max_query_len == 1
        and x.shape[0] == meta.seq_lens.shape[0]
        and x.dtype == torch.float32
        and cache.k.dtype == torch.float32
        and qn.enabled()
    ):
        return None
    native = block.native_decode
    if native is None:
        native = block.native_decode = _build(block)
    if native is _UNSUPPORTED:
        return None
    return native.forward(
        x.contiguous(), h.contiguous(), positions.contiguous(), meta.slot_mapping.contiguous(),
        meta.block_tables.contiguous(), meta.seq_lens.contiguous(), cache.k, cache.v,
    )  # fmt: skip


def _weights(layer: object) -> list[QuantTensor] | None:
    """The CPU blocks of a QuantLinear or FusedQuantLinear, if the extension runs them all."""
    if type(layer) is QuantLinear:
        parts = [layer]
    elif type(layer) is FusedQuantLinear and layer.parts is not None:
        parts = layer.parts
    else:
        return None
    weights = [part.weight for part in parts]
    ok = all(isinstance(w, QuantTensor) and qn.supports(w) for w in weights)
    return weights if ok else None


def _build(block) -> object:
    """The extension's DecodeBlock for `block`, or _UNSUPPORTED."""
    native = qn.load_native()
    cfg = block.config
    qkv = _weights(block.attn_qkv)
    if block.attn_v is not None and qkv is not None:
        v = _weights(block.attn_v)
        qkv = None if v is None else qkv + v
    o, gate_up, down = (_weights(layer) for layer in
                        (block.attn_output, block.ffn_gate_up, block.ffn_down))  # fmt: skip
    if (
        native is None
        or None in (qkv, o, gate_up, down)
        or block.next_norm is None
        or cfg.hidden_act not in ACTIVATIONS
        or block.rotary.cos.device.type != "cpu"
    ):
        return _UNSUPPORTED

    def blocks(weights: list[QuantTensor]) -> tuple[list[torch.Tensor], list[int]]:
        return [w.data for w in weights], [int(w.qtype) for w in weights]

    def vec(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().contiguous()

    ffn = sum(w.shape[0] for w in gate_up) // 2
    return native.make_decode_block(
        *blocks(qkv), o[0].data, int(o[0].qtype), *blocks(gate_up), down[0].data,
        int(down[0].qtype), vec(block.attn_q_norm), vec(block.attn_k_norm),
        vec(block.post_attention_norm), vec(block.ffn_norm), vec(block.post_ffw_norm),
        vec(block.next_norm), vec(block.qkv_bias), block.rotary.cos.contiguous(),
        block.rotary.sin.contiguous(), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
        cfg.head_dim, ffn, block.sliding_window, cfg.rms_norm_eps, cfg.attention_scale,
        cfg.attn_logit_softcapping, cfg.rope_neox, ACTIVATIONS[cfg.hidden_act],
        qn.decode_int8(),
    )  # fmt: skip
