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
