"""The whole model on the GPU (Triton matmuls, fp16 KV cache) against the CPU reference path."""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    return write_gemma3_gguf(path, **{**TINY, "sliding_window": 16}, seed=3)


def _greedy(path, device: str, gpu_layers: int, prompts: list[list[int]]) -> list[list[int]]:
    config = EngineConfig(
        ctx_size=256,
        n_parallel=4,
        batch_size=256,
        ubatch_size=64,
        gpu_layers=gpu_layers,
        device=device,
    )
    loaded = load(str(path), config, verbose=False)
    engine = loaded.llm_engine
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        for p in prompts
    ]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    loaded.close()
    return [out[i] for i in ids]


def test_gpu_greedy_equals_cpu_and_partial_offload(tiny_path):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, 1000, (n,), generator=gen).tolist() for n in (5, 40, 90)]
    cpu = _greedy(tiny_path, "cpu", 0, prompts)
    gpu = _greedy(tiny_path, "cuda", 99, prompts)
    partial = _greedy(tiny_path, "cuda", 2, prompts)  # blocks 2, 3 on the GPU, head on the CPU
    # bf16 tensor-core prefill and an fp16 cache differ from fp32 in the last bits: compare the
    # first tokens exactly and require most of the rest to agree.
    for c, g, p in zip(cpu, gpu, partial, strict=True):
        assert c[:4] == g[:4] == p[:4]
        assert sum(a == b for a, b in zip(c, g, strict=False)) >= 9
        assert sum(a == b for a, b in zip(c, p, strict=False)) >= 9


def _config(**extra) -> EngineConfig:
    return EngineConfig(ctx_size=256, n_parallel=2, batch_size=256, ubatch_size=64, gpu_layers=99,
                        device="cuda", extra=extra)


def test_prefill_graphs_match_the_eager_forward(tiny_path):
    """A prompt chunk replayed through a prefill graph (padded to its bucket) gives the eager
    forward's last-token logits: a first chunk of 2, 17 and 64 tokens and a 17-token chunk over
    64 cached ones."""
    from tests.unit.test_prefill_graphs import prefill_chunks

    loaded = load(str(tiny_path), _config(), verbose=False)
    runner = loaded.llm_engine.model_runner
    graphs = runner.prefill_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64]
    failures = []
    for x, pos, slots, seq_len, table, swa, eager in prefill_chunks(runner):
        with torch.inference_mode():
            graph = graphs.run(x, pos, slots, seq_len, table, *swa).clone()
        err = ((graph - eager).abs().max() / eager.abs().max()).item()
        if graph.shape != eager.shape or not err < 2e-2:
            failures.append(f"positions {int(pos[0])}+{len(pos)}: {tuple(graph.shape)} rel err "
                            f"{err:.3g}")
    loaded.close()
    assert not failures, "; ".join(failures)


def test_engine_prefills_one_prompt_through_a_graph(tiny_path, monkeypatch):
    """A lone prompt's chunks take the prefill graphs, and greedy decoding starts as without."""
    from llcuda.runner.cuda_graphs import PrefillGraphs

    calls = []
    run = PrefillGraphs.run
    monkeypatch.setattr(PrefillGraphs, "run", lambda self, x, *a: calls.append(len(x)) or
                        run(self, x, *a))
    prompt = torch.randint(300, 1000, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = []
    used = []
    for extra in ({}, {"prefill_graphs": False}):
        loaded = load(str(tiny_path), _config(**extra), verbose=False)
        calls.clear()  # the warm-up's steps
        outs.append(_run_one(loaded.llm_engine, prompt, params))
        used.append(list(calls))
        loaded.close()
    assert used == [[64, 64, 22], []]  # chunks of ubatch_size 64, only with the graphs on
    assert outs[0][:4] == outs[1][:4] and sum(a == b for a, b in zip(*outs, strict=True)) >= 6


def _run_one(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens.extend(o.new_token_ids)
    return tokens
