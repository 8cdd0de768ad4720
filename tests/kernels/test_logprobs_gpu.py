"""Log-probs on the GPU engine (CUDA graphs, decode bursts, chained bursts) against the CPU path.

A mixed batch (some rows asking for log-probs, some not; greedy and seeded sampling) must pick
the tokens of the same batch asking for none, bursts the tokens of single steps, and every
reported log-prob must be the CPU path's teacher-forced log_softmax for its prefix, up to the
GPU's rounding (tolerances of test_gpu_archs: the twin's logits are sharp).
"""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.twins import write_twin
from llcuda.sampling_params import SamplingParams
from tests.kernels.test_gpu_archs import GPU_MAX_TOL, GPU_MEAN_TOL, NEAR_TIE
from tests.models.forward_helpers import open_gemma, sequence_logits

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TWIN = "llama3"


@pytest.fixture(scope="module")
def twin_path(tmp_path_factory):
    return write_twin(tmp_path_factory.mktemp("twins") / f"{TWIN}.gguf", TWIN, seed=0)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 17, 45, 8)]


def _params(with_logprobs: bool) -> list[SamplingParams]:
    ks = [5, None, 20, 0] if with_logprobs else [None] * 4
    temps = [0.0, 1.0, 1.0, 0.0]
    return [SamplingParams(max_tokens=40, temperature=t, top_k=0, top_p=1.0, min_p=0.0,
                           seed=7 + i, logprobs=k, ignore_eos=True)
            for i, (t, k) in enumerate(zip(temps, ks, strict=True))]  # fmt: skip


def _generate(path, prompts, params, decode_steps: int | None):
    # no warm-up workload: it compiles kernels for every batch shape (test_gpu_archs)
    config = EngineConfig(ctx_size=128, n_parallel=4, batch_size=128, ubatch_size=32,
                          device=DEVICE, num_scheduler_steps=decode_steps,
                          extra={"warm_up": False})  # fmt: skip
    loaded = load(str(path), config, verbose=False)
    try:
        if DEVICE == "cuda":
            assert loaded.llm_engine.model_runner.graphs is not None
        return loaded.llm_engine.generate(prompts, params)
    finally:
        loaded.close()


def test_gpu_logprobs_are_the_cpu_log_softmax_and_change_no_token(twin_path):
    gguf, cpu_model = open_gemma(twin_path, "cpu")
    try:
        prompts = _prompts(cpu_model.config.vocab_size)
        plain = _generate(twin_path, prompts, _params(False), None)  # bursts of 16 on a GPU
        bursts = _generate(twin_path, prompts, _params(True), None)
        single = _generate(twin_path, prompts, _params(True), 1)
        tokens = [o.new_token_ids for o in plain]
        assert [o.new_token_ids for o in bursts] == tokens  # the same schedule and kernels
        diffs = []
        for prompt, b, s, k in zip(prompts, bursts, single, [5, None, 20, 0], strict=True):
            if k is None:
                assert b.new_logprobs is None and s.new_logprobs is None
                continue
            assert [lp.token_id for lp in b.new_logprobs] == b.new_token_ids
            assert [len(lp.top) for lp in b.new_logprobs] == [k] * len(b.new_token_ids)
            # single steps replay the same decode graphs one at a time: the same numbers while
            # they pick the same tokens (a near-tie may part them later)
            same = next((i for i, (x, y) in enumerate(zip(b.new_token_ids, s.new_token_ids,
                                                          strict=True)) if x != y),
                        len(b.new_token_ids))  # fmt: skip
            assert same >= 4
            assert [lp.logprob for lp in b.new_logprobs[:same]] == pytest.approx(
                [lp.logprob for lp in s.new_logprobs[:same]], abs=1e-3)  # fmt: skip
            ids = prompt + b.new_token_ids
            positions = list(range(len(prompt) - 1, len(ids) - 1))
            ref = torch.log_softmax(sequence_logits(cpu_model, ids, positions).float(), dim=-1)
            for i, lp in enumerate(b.new_logprobs):
                diffs.append(abs(lp.logprob - ref[i, lp.token_id].item()))
                tops = [v for _, v in lp.top]
                assert tops == sorted(tops, reverse=True)
                if k:  # the best alternative is the CPU's best, up to near-ties
                    best = ref[i].max().item()
                    assert ref[i, lp.top[0][0]].item() > best - NEAR_TIE
        diffs_t = torch.tensor(diffs)
        assert diffs_t.mean().item() < GPU_MEAN_TOL and diffs_t.max().item() < GPU_MAX_TOL, (
            diffs_t.mean().item(), diffs_t.max().item())  # fmt: skip
    finally:
        gguf.close()
