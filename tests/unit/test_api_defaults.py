"""InferenceEngine's defaults on the real engine (tiny synthetic Gemma 3, CPU).

`batch_infer` with every setting left alone must batch (n_parallel automatic, llama-server's
`-np -1`) without more KV memory than one context; model_info reports what really runs.
"""

from __future__ import annotations

import pytest

from llcuda import InferenceEngine
from llcuda.gguf.synthetic import write_gemma3_gguf

# smaller than synthetic.TINY: this file checks the facade's defaults, not the model's numbers
SMALL = dict(n_embd=64, n_layers=2, n_ff=128, n_head=2, n_kv_head=1, head_dim=32, vocab_size=640)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "small.gguf", **SMALL)


def _max_running(engine: InferenceEngine) -> list[int]:
    """Record how many sequences each engine step ran (wraps LLMEngine.step)."""
    llm_engine = engine._loaded.llm_engine
    seen: list[int] = []
    step = llm_engine.step

    def counting_step():
        seen.append(llm_engine.scheduler.num_running)
        return step()

    llm_engine.step = counting_step
    return seen


def test_batch_infer_batches_with_default_settings(tiny_path, capsys):
    with InferenceEngine() as engine:
        engine.load_model(tiny_path, ctx_size=256)  # everything else default
        err = capsys.readouterr().err
        assert "running on the CPU" in err  # verbose by default: said once at load
        info = engine.model_info()
        assert (info["n_parallel"], info["n_parallel_auto"]) == (4, True)
        assert (info["device"], info["gpu_layers"], info["cache_size"]) == ("cpu", 0, 256)
        assert info["chat_template"] == "gemma"  # the synthetic file has none: the builtin
        assert "architecture 'gemma3'" in info["chat_template_source"]
        auto_kv = engine.memory_report()["kv_cache"]
        running = _max_running(engine)
        results = engine.batch_infer(["Test prompt"] * 10, max_tokens=4, ignore_eos=True)
        assert all(r.success and r.tokens_generated == 4 for r in results)
        assert max(running) == 4  # four at a time, not one after another
        assert all(r.tokens_per_sec > 0 for r in results)

        engine.load_model(tiny_path, ctx_size=256, auto_start=False, verbose=False, n_parallel=4)
        assert engine.model_info()["cache_size"] == 4 * 256
        # the automatic pool holds one context: its KV memory is well under four contexts'
        assert auto_kv < engine.memory_report()["kv_cache"]
