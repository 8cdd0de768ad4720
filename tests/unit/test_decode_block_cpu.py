"""The C++ decode step of a decoder block (kernels/decode_block_cpu) against the reference ops.

Every block of small random-weight files of each architecture family (Gemma 3's q/k norms and
sandwich norms, Gemma 2's attention soft-cap, Llama's NORM RoPE and SwiGLU, Qwen 2's q|k|v
bias, Phi 3's fused q|k|v and gate|up), sliding-window layers included, takes one decode token
of several sequences of different lengths over a paged cache holding random past keys and
values. The native call must give the reference path's residual, next norm and cache contents
up to fp32 rounding (both run the same GEMVs; only the order of the small sums differs), and
must decline what it does not run. With int8 activations (LLCUDA_CPU_INT8, the default) the
reference's matmuls take quantize_q8_ref of their inputs, the GEMVs' specification.
"""

from __future__ import annotations

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.gguf.twins import write_twin
from llcuda.kernels import decode_block_cpu, ops
from llcuda.kernels import quant_cpu_native as qn
from llcuda.kernels.q8_activations import quantize_q8_ref
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.models.registry import build_model

BLOCK_SIZE = 8
# one new token each; 20 and 600 reach past the twins' window of 16, and 600 makes the
# global layers' attention large enough to be shared out to the thread pool
CTX_LENS = [1, 20, 600]
# the twins' type cycle without F16 (which the native path does not take)
NATIVE_CYCLE = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0)
TWINS = ["gemma2", "llama", "qwen2", "phi3"]


@pytest.fixture(scope="module", autouse=True)
def native():
    if qn.load_native() is None:
        pytest.skip("the CPU extension could not be built here (no compiler)")


def _model(path):
    gguf = GGUFFile(path)
    config = model_config_from_gguf(gguf)
    cpu = torch.device("cpu")
    return build_model(gguf, config, [cpu] * config.num_layers, cpu, max_positions=1024)


@pytest.fixture(scope="module", params=["gemma3"] + TWINS)
def model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":  # Q4_K_M's mix: Q5_0 / Q8_0 / Q4_K / Q6_K, as the real file
        return _model(write_gemma3_gguf(directory / "g.gguf", **TINY))
    return _model(write_twin(directory / "t.gguf", request.param, type_cycle=NATIVE_CYCLE))


def _step(config, gen):
    """Metadata of one decode token for each of CTX_LENS, over shuffled cache blocks, and a
    cache of random past entries."""
    per_seq = -(-max(CTX_LENS) // BLOCK_SIZE)
    num_blocks = per_seq * len(CTX_LENS) + 2
    order = torch.randperm(num_blocks, generator=gen)[: per_seq * len(CTX_LENS)]
    tables = order.view(len(CTX_LENS), per_seq).to(torch.int32)
    lens = torch.tensor(CTX_LENS, dtype=torch.int32)
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE
    meta = AttentionMetadata(
        slot_mapping=slots + pos % BLOCK_SIZE, query_start_loc=torch.arange(4, dtype=torch.int32),
        seq_lens=lens, block_tables=tables, max_query_len=1, max_seq_len=max(CTX_LENS),
    )  # fmt: skip
    shape = (num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    cache = KVCache(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    return pos, meta, cache


def _reference(block, *args, int8: bool = False):
    """The block on the reference ops; int8: its matmuls take quantize_q8_ref of their inputs."""
    saved, block.native_decode = block.native_decode, decode_block_cpu._UNSUPPORTED
    exact = ops.quant_matmul
    if int8:
        ops.quant_matmul = lambda x, w, **kw: exact(quantize_q8_ref(x), w, **kw)
    try:
        return block(*args)
    finally:
        block.native_decode = saved
        ops.quant_matmul = exact


@pytest.fixture(params=[True, False], ids=["int8", "fp32"])
def int8(request, monkeypatch):
    """The native GEMVs' activations: int8 (LLCUDA_CPU_INT8=1, the default) or fp32."""
    monkeypatch.setenv("LLCUDA_CPU_INT8", "1" if request.param else "0")
    return request.param


def test_every_block_matches_the_reference_ops(model, int8):
    gen = torch.Generator().manual_seed(0)
    config = model.config
    for block in model.layers:
        block.native_decode = None  # built again in this mode
    for index, block in enumerate(model.layers):
        pos, meta, cache = _step(config, gen)
        x = torch.randn(len(CTX_LENS), config.hidden_size, generator=gen)
        h = torch.randn(len(CTX_LENS), config.hidden_size, generator=gen)
        ref_cache = KVCache(cache.k.clone(), cache.v.clone())
        before = cache.k.clone()
        want = _reference(block, x, h, pos, meta, ref_cache, int8=int8)[:2]  # no Q8Rows on CPU
        # int8: an input the two paths round differently in its last bit may sit on a rounding
        # tie of its quantization and take the other neighbour (phi3's block 1 here, 0.08 of
        # the int8-vs-fp32 distance, against 1e-6 elsewhere); a quarter of that distance allows
        # it and still fails a path that skips or misplaces the quantization
        slack = [0.0, 0.0]
        if int8:
            fp32 = _reference(block, x, h, pos, meta, KVCache(cache.k.clone(), cache.v.clone()))
            slack = [0.25 * (a - b).abs().max().item()
                     for a, b in zip(want, fp32[:2], strict=True)]  # fmt: skip
        through_block = KVCache(cache.k.clone(), cache.v.clone())
        got = decode_block_cpu.decode_block(block, x, h, pos, meta, cache)
        assert got is not None, f"block {index} was not run natively"
        # DecoderBlock itself takes the native path for such a step
        for a, b in zip(block(x, h, pos, meta, through_block)[:2], got, strict=True):
            assert torch.equal(a, b)
        for name, g, w, tie in zip(("x", "h"), got, want, slack, strict=True):
            scale = w.abs().max().item()
            torch.testing.assert_close(
                g, w, rtol=1e-4, atol=max(1e-5 * scale, tie),
                msg=lambda m, n=name, i=index: f"block {i} {n}: {m}",
            )  # fmt: skip
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-4, atol=1e-5)
        # this step's keys went to its slots, and nowhere else
        written = torch.zeros(cache.k.shape[:2], dtype=torch.bool).view(-1)
        written[meta.slot_mapping] = True
        changed = (cache.k != before).flatten(2).any(-1).view(-1)
        assert torch.equal(changed, written), f"block {index}"


def test_declines_prefill_and_other_dtypes():
    # the checks come before the block is looked at, so a bare object stands in for it
    x = torch.zeros(2, 8)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(2, dtype=torch.int64), query_start_loc=torch.tensor([0, 2]),
        seq_lens=torch.tensor([2]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=2, max_seq_len=2,
    )  # fmt: skip
    cache = KVCache(torch.zeros(1, 8, 1, 8), torch.zeros(1, 8, 1, 8))
    args = (x, x, torch.arange(2), meta, cache)
    assert decode_block_cpu.decode_block(object(), *args) is None  # two tokens of one sequence
    half = KVCache(cache.k.half(), cache.v.half())
    meta.max_query_len, meta.seq_lens = 1, torch.tensor([1, 1])
    assert decode_block_cpu.decode_block(object(), x, x, torch.arange(2), meta, half) is None
