"""The sampler: greedy ties, llama.cpp filter semantics, repeat penalty, seeds, distributions."""

from __future__ import annotations

import math

import pytest
import torch

from llcuda.runner.sampler import apply_repeat_penalty, sample
from llcuda.sampling_params import SamplingParams

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # every filter disabled


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{**OFF, "temperature": 1.0, **kw})


def _sample_many(logits_row: list[float], n: int, **kw) -> torch.Tensor:
    """n independent unseeded draws from one distribution (one batch, n identical rows)."""
    logits = torch.tensor([logits_row] * n, dtype=torch.float32)
    p = _params(**kw)
    return sample(logits, [p] * n, [None] * n, [[]] * n)


def _log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-2.0, -1.0, -3.0, -1.0]])
    n = logits.shape[0]
    out = sample(logits, [SamplingParams(temperature=0.0)] * n, [None] * n, [[]] * n)
    assert out.dtype == torch.int64
    assert out.tolist() == [1, 0, 1]


def test_top_k_1_equals_greedy_whatever_the_temperature():
    torch.manual_seed(0)
    logits = torch.randn(16, 100)
    params = [SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0)] * 16
    out = sample(logits, params, [None] * 16, [[]] * 16)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_keeps_only_the_k_best():
    torch.manual_seed(1)
    out = _sample_many([0.0, 1.0, 2.0, 3.0, 2.5], 2000, top_k=2)
    assert set(out.tolist()) == {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(2)
    logits = _log_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_sample_many(logits, 3000, top_p=0.75).tolist()) == {0, 1}
    assert set(_sample_many(logits, 3000, top_p=0.85).tolist()) == {0, 1, 2}
    # the first candidate always survives, even for p = 0 (llama.cpp)
    assert set(_sample_many(logits, 200, top_p=0.0).tolist()) == {0}


def test_top_p_sees_the_temperature_1_distribution():
    # llama.cpp applies temperature last: a hot temperature does not widen the top_p set
    torch.manual_seed(3)
    logits = _log_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_sample_many(logits, 3000, top_p=0.75, temperature=50.0).tolist()) == {0, 1}


def test_min_p_threshold_is_relative_to_the_best_token():
    torch.manual_seed(4)
    logits = _log_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_sample_many(logits, 3000, min_p=0.2).tolist()) == {0, 1, 2}  # keep p >= 0.1
    assert set(_sample_many(logits, 3000, min_p=0.5).tolist()) == {0, 1}  # keep p >= 0.25


def test_filters_compose_in_llama_cpp_order():
    # top_k=3 drops token 3; top_p over the renormalised three (0.526, 0.316, 0.158) at 0.8
    # keeps {0, 1}; min_p 0.7 then keeps only p >= 0.7 * p_max -> {0}
    torch.manual_seed(5)
    logits = _log_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_sample_many(logits, 2000, top_k=3, top_p=0.8).tolist()) == {0, 1}
    assert set(_sample_many(logits, 500, top_k=3, top_p=0.8, min_p=0.7).tolist()) == {0}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_the_tempered_softmax(temperature):
    torch.manual_seed(6)
    logits = [1.0, 0.0, -1.0, 0.5]
    n = 40000
    out = _sample_many(logits, n, temperature=temperature)
    freq = torch.bincount(out, minlength=4).double() / n
    expected = torch.tensor(logits, dtype=torch.float64).div(temperature).softmax(-1)
    # 5 standard deviations of a binomial frequency
    tol = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((freq - expected).abs() < tol), (freq, expected)


def test_frequencies_after_top_k_renormalise():
    torch.manual_seed(7)
    logits = [2.0, 1.0, 0.0, -1.0]
    n = 40000
    out = _sample_many(logits, n, top_k=2, temperature=0.7)
    freq = torch.bincount(out, minlength=4).double() / n
    expected = torch.tensor([2.0, 1.0], dtype=torch.float64).div(0.7).softmax(-1)
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], expected, atol=0.015)


def test_repeat_penalty_on_a_known_vector():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=64)
    # positive logits are divided, non-positive multiplied; a repeated token is penalised once
    out = apply_repeat_penalty(logits, [p], [[0, 1, 1, 4]])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, 0.0]]  # input untouched


def test_repeat_penalty_window():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    history = [[0, 1, 2]]
    last1 = SamplingParams(repeat_penalty=2.0, repeat_last_n=1)
    assert apply_repeat_penalty(logits, [last1], history).tolist() == [[2.0, 2.0, 1.0]]
    every = SamplingParams(repeat_penalty=2.0, repeat_last_n=-1)
    assert apply_repeat_penalty(logits, [every], history).tolist() == [[1.0, 1.0, 1.0]]
    off = SamplingParams(repeat_penalty=2.0, repeat_last_n=0)
    assert apply_repeat_penalty(logits, [off], history) is logits


def test_repeat_penalty_changes_the_greedy_choice_per_row():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    penal = SamplingParams(temperature=0.0, repeat_penalty=2.0)
    plain = SamplingParams(temperature=0.0)
    out = sample(logits, [penal, plain], [None, None], [[0], [0]])
    assert out.tolist() == [1, 0]


def test_mixed_batch_keeps_greedy_rows_exact():
    torch.manual_seed(8)
    logits = torch.randn(6, 50)
    greedy = SamplingParams(temperature=0.0)
    hot = _params(temperature=1.5)
    params = [greedy, hot, greedy, hot, hot, greedy]
    out = sample(logits, params, [None] * 6, [[]] * 6)
    argmax = logits.argmax(-1)
    for i in (0, 2, 5):
        assert out[i] == argmax[i]
    assert logits.equal(logits)  # sample never writes into the caller's logits


def _seeded_draws(row_logits, params, seed, others, steps=20):
    """Tokens a seeded row draws over `steps` calls while sharing the batch with `others`."""
    gen = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(steps):
        rows = [row_logits] + [o[0] for o in others]
        logits = torch.stack(rows)
        all_params = [params] + [o[1] for o in others]
        gens = [gen] + [o[2] for o in others]
        drawn.append(sample(logits, all_params, gens, [[]] * len(rows))[0].item())
    return drawn


def test_seeded_row_is_reproducible_whatever_the_batch():
    torch.manual_seed(9)
    row = torch.randn(300)
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, seed=1)
    alone = _seeded_draws(row, p, seed=1234, others=[])
    other_gen = torch.Generator().manual_seed(99)
    crowded = _seeded_draws(
        row,
        p,
        seed=1234,
        others=[
            (torch.randn(300), SamplingParams(temperature=0.0), None),  # greedy neighbour
            (torch.randn(300), _params(top_k=0), None),  # k_max becomes the whole vocab
            (torch.randn(300), _params(top_k=7, temperature=0.3), other_gen),
        ],
    )
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples
    assert _seeded_draws(row, p, seed=4321, others=[]) != alone


def test_rejects_mismatched_arguments():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="2 logit rows"):
        sample(logits, [SamplingParams()], [None], [[]])
    with pytest.raises(ValueError, match="num_seqs, vocab"):
        sample(torch.zeros(5), [SamplingParams()], [None], [[]])
    assert sample(torch.zeros(0, 5), [], [], []).shape == (0,)


@pytest.mark.gpu
def test_cuda_sampling_never_syncs_and_matches_semantics():
    device = torch.device("cuda")
    torch.manual_seed(10)
    vocab = 262144
    logits = torch.randn(8, vocab, device=device)
    gens = [torch.Generator(device=device).manual_seed(i) if i % 2 else None for i in range(8)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1),
        SamplingParams(temperature=0.9, top_k=0, top_p=0.9, min_p=0.0, repeat_penalty=1.3),
        SamplingParams(top_k=1),
        SamplingParams(temperature=1.2, top_k=100, min_p=0.1),
        SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=-1),
        SamplingParams(),
        SamplingParams(top_p=0.5),
    ]
    history = [[1, 2, 3, 70000]] * 8
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, params, gens, history)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.shape == (8,)
    ref = apply_repeat_penalty(logits, params, history).argmax(-1)
    assert out[0] == ref[0] and out[3] == ref[3] and out[5] == ref[5]
    # the same seeded row on CUDA draws the same tokens alone and in this batch
    g1 = torch.Generator(device=device).manual_seed(1)
    alone = sample(logits[1:2], params[1:2], [g1], history[:1])
    assert alone[0] == out[1]
