"""`llcuda bench` on a tiny synthetic Gemma 3: the table and its numbers are well formed."""

from __future__ import annotations

import pytest

from llcuda.bench import run_bench
from llcuda.cli import main
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", **TINY)


def test_run_bench_reports_positive_rates(tiny):
    result = run_bench(str(tiny), n_prompt=24, n_gen=4, reps=1, device="cpu")
    assert result.pp_tok_s > 0 and result.tg_tok_s > 0
    assert result.weight_bytes > 0 and result.weight_gb_s > 0
    assert "| pp24 tok/s | tg4 tok/s |" in result.markdown()


def test_bench_rejects_bad_counts(tiny):
    with pytest.raises(ValueError, match="n_gen"):
        run_bench(str(tiny), n_prompt=8, n_gen=1, reps=1, device="cpu")


def test_cli_bench_prints_the_table(tiny, capsys):
    assert main(["bench", str(tiny), "-p", "16", "-n", "3", "-r", "1", "--device", "cpu"]) == 0
    assert "tg3 tok/s" in capsys.readouterr().out


def test_decode_rate_counts_tokens_when_sampled_not_when_delivered():
    from llcuda.bench import _decode_rate

    # depth 0: a one-token prompt whose first step is a 16-token burst; the last step only hands
    # out the previous burst's tokens (sampled count unchanged): 32 tokens in 2 s
    assert _decode_rate([(0.0, 0), (1.0, 16), (2.0, 32), (2.5, 32)], depth=0) == 16.0
    # depth > 0: the prefill samples token 1 at t=1; 32 more follow by t=3
    assert _decode_rate([(0.0, 0), (1.0, 1), (2.0, 17), (3.0, 33), (3.5, 33)], depth=512) == 16.0


def test_run_marks_follow_the_request_through_decode_bursts(tiny):
    from llcuda.bench import _run
    from llcuda.config import EngineConfig
    from llcuda.engine.loader import load

    config = EngineConfig(ctx_size=64, n_parallel=1, device="cpu", num_scheduler_steps=4)
    loaded = load(str(tiny), config, verbose=False)
    try:
        marks = _run(loaded.llm_engine, [5], 10)
    finally:
        loaded.close()
    counts = [count for _, count in marks]
    times = [t for t, _ in marks]
    assert counts[0] == 0 and counts[-1] == 10 and counts == sorted(counts)
    assert times == sorted(times)
    assert counts[1] == 4  # the one-token prompt's step was a burst of four
