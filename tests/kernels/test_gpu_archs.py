"""Every architecture's twin on the GPU path against the CPU path and against transformers' fp32.

The twins (llcuda.gguf.twins) and the oracle data (tests/data/oracle, scripts/make_oracle.py) are
those of tests/models/test_arch_oracle.py, where the CPU path agrees with transformers to float
rounding. The GPU path rounds differently (fp16 KV cache, bf16 tensor-core products for
prefill-sized matmuls, fp32 GEMV for decode), which moves log-probs by hundredths of a nat.
Then the whole engine on the GPU (CUDA graphs, decode bursts, continuous batching): every token
it picks greedily must be an argmax of the CPU path up to near-ties.
"""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.twins import TWINS, write_twin
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.sampling_params import SamplingParams
from tests.models.forward_helpers import open_gemma, sequence_logits
from tests.models.test_arch_oracle import compare_to_oracle, load_oracle

pytestmark = pytest.mark.gpu

# The twins' weights are scaled to give sharp logits (a wrong rope or mask must show), so the GPU's
# rounding moves them more than a real model's: on the H100, mean |GPU - CPU| over the CPU's top-5
# 0.02 nats and max 0.11 (qwen2), 0.14 from transformers (phi3). A wrong rope style, scale or
# mask is off by a nat or more (tests/models/test_arch_oracle.py).
GPU_MEAN_TOL = 0.05
GPU_MAX_TOL = 0.3
# A greedy pick within this of the CPU's best counts as an argmax. Two tokens each moved by the
# GPU's rounding can swap across about twice its mean spread: on the H100 llama3-iq4_xs swapped
# one pair 0.124 apart (IQ4 code-book values reach 127 d through bf16 tensor-core products).
NEAR_TIE = 0.15


@pytest.fixture(scope="module", params=list(TWINS))
def twin(request, tmp_path_factory):
    name = request.param
    oracle = load_oracle(name)
    path = write_twin(tmp_path_factory.mktemp("twins") / f"{name}.gguf", name, oracle["seed"])
    return name, path, oracle


def _logprobs(path, device: str, ids: list[int], chunk: int = 24) -> torch.Tensor:
    gguf, model = open_gemma(path, device)
    try:
        logits = sequence_logits(model, ids, list(range(len(ids))), chunk=chunk, block_size=16)
    finally:
        gguf.close()
    return torch.log_softmax(logits.float().cpu(), dim=-1)  # [num_tokens, vocab]


def _one_token_step(model, token: int) -> torch.Tensor:
    """model.forward's output [1, hidden] for `token` at position 0, in a fresh one-block cache."""
    cfg, dev = model.config, torch.device("cuda")
    caches = [KVCache.allocate(1, 16, cfg.num_kv_heads, cfg.head_dim, torch.float16, dev)
              for _ in model.block_devices]  # fmt: skip
    i32 = torch.int32
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0]), query_start_loc=torch.tensor([0, 1], dtype=i32),
        seq_lens=torch.tensor([1], dtype=i32), block_tables=torch.zeros((1, 1), dtype=i32),
        max_query_len=1, max_seq_len=1,
    ).to(dev)  # fmt: skip
    x = model.embed(torch.tensor([token], device=dev))
    return model.forward(x, torch.tensor([0], device=dev), {dev: meta}, caches)


# The int8 rounding of activations alone moves a random-weight twin's log-probs by ~0.05 nats on
# average, 0.6 at most (quant_matmul.gemv_int8; llama.cpp's MMVQ rounds the same way): the first
# device run of the test below measured 0.052 / 0.24 on llama3-q3_k_m with int8 everywhere
INT8_MEAN_TOL, INT8_MAX_TOL = 0.1, 0.6


# Twins in llama.cpp's mixes, whose q|k|v and gate|up share a type (the llama3 and gemma3 twins
# cycle every projection through a different type, so none of their norms writes Q8Rows)
@pytest.mark.parametrize("name", ["llama3-q3_k_m", "llama3-iq4_xs"])
def test_int8_decode_reads_the_norms_q8_rows(name, tmp_path, monkeypatch):
    """One-token steps with int8 activations in every GEMV that takes them (LLCUDA_GEMV_INT8=1;
    the twins are below the size that turns them on by default): the GEMVs reading the Q8Rows
    their norms wrote (LLCUDA_GEMV_XPRE=1) give what they give quantizing x themselves
    (LLCUDA_GEMV_XPRE=0), and both stay within int8 rounding of the CPU path."""
    oracle = load_oracle(name)
    path = write_twin(tmp_path / f"{name}.gguf", name, oracle["seed"])
    ids = oracle["token_ids"][:24]
    monkeypatch.setenv("LLCUDA_GEMV_INT8", "1")
    monkeypatch.setenv("LLCUDA_GEMV_XPRE", "1")
    gguf, model = open_gemma(path, "cuda")
    try:  # the norms are asked for Q8Rows wherever a GEMV of the block's type reads them
        assert any(layer.q8_attn or layer.q8_ffn for layer in model.layers), name
        # a one-token step's output: the LM head reads the last norm's Q8Rows beside it, and
        # gives what it gives quantizing a copy itself
        hidden = _one_token_step(model, ids[0])
        if model.output.reads_q8_rows():  # not for an F16 / F32 head
            assert model._last_q8 is not None and model._last_q8[0] is hidden, name
            with_rows, own = model.compute_logits(hidden), model.compute_logits(hidden.clone())
            torch.testing.assert_close(with_rows, own, rtol=1e-4,
                                       atol=1e-4 * own.abs().max().item())  # fmt: skip
    finally:
        gguf.close()
    got = {}
    for xpre in ("1", "0"):
        monkeypatch.setenv("LLCUDA_GEMV_XPRE", xpre)
        got[xpre] = _logprobs(path, "cuda", ids, chunk=1)
    assert (got["1"] - got["0"]).abs().max().item() < 1e-3, name
    cpu = _logprobs(path, "cpu", ids)
    top = torch.topk(cpu, 5).indices
    diff = (cpu.gather(1, top) - got["1"].gather(1, top)).abs()
    assert diff.mean().item() < INT8_MEAN_TOL and diff.max().item() < INT8_MAX_TOL, (
        name, diff.mean().item(), diff.max().item())  # fmt: skip


def test_gpu_teacher_forced_matches_cpu_and_oracle(twin):
    name, path, oracle = twin
    ids = oracle["token_ids"]
    cpu, gpu = _logprobs(path, "cpu", ids), _logprobs(path, "cuda", ids)
    top = torch.topk(cpu, 5).indices
    diff = (cpu.gather(1, top) - gpu.gather(1, top)).abs()
    assert diff.mean().item() < GPU_MEAN_TOL and diff.max().item() < GPU_MAX_TOL, (
        name, diff.mean().item(), diff.max().item())  # fmt: skip
    max_diff, wrong = compare_to_oracle(gpu, oracle)
    assert max_diff < GPU_MAX_TOL, f"{name}: GPU vs transformers {max_diff:.3g}"
    gaps = torch.topk(cpu, 2).values
    near = gaps[:, 0] - gaps[:, 1] < NEAR_TIE
    assert all(near[p] for p in wrong), (name, wrong)


def test_gpu_engine_greedy_is_cpu_argmax(twin):
    """Prompts of several lengths batched together through the GPU engine; each picked token
    teacher-forced through the CPU path must be its argmax or within NEAR_TIE of it."""
    name, path, oracle = twin
    vocab = TWINS[name].vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 17, 45)]
    # no warm-up workload: it compiles kernels for every batch shape, minutes over eight twins
    config = EngineConfig(ctx_size=128, n_parallel=4, batch_size=128, ubatch_size=32,
                          device="cuda", extra={"warm_up": False})  # fmt: skip
    loaded = load(str(path), config, verbose=False)
    engine = loaded.llm_engine
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    loaded.close()
    for prompt, rid in zip(prompts, ids, strict=True):
        picked = out[rid]
        assert len(picked) == 10, (name, picked)
        lp = _logprobs(path, "cpu", prompt + picked)[len(prompt) - 1 : -1]  # [10, vocab]
        chosen = lp.gather(1, torch.tensor(picked)[:, None])[:, 0]
        shortfall = lp.max(dim=-1).values - chosen
        assert (shortfall < NEAR_TIE).all(), (name, len(prompt), shortfall.tolist())
