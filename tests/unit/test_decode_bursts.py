"""Decode bursts (config.num_scheduler_steps): several decode steps per scheduling round.

A burst must change nothing a user sees except how tokens are grouped into deltas: the same
tokens, text, finish reasons and counts as one step at a time, with stop strings, EOG, max_tokens
and ctx_size met inside a burst, and every KV block back in the pool at the end. The fake runners
of test_llm_engine check the paging (a burst writes positions its block table must already cover).
"""

from __future__ import annotations

import pytest

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import LLMEngine, RequestOutput, _Ready
from llcuda.sampling_params import SamplingParams
from tests.unit.test_llm_engine import (
    EOG,
    PARAMS,
    PROMPTS,
    FakeKVRunner,
    ScriptRunner,
    _config,
    _key,
    make_engine,
)


def _generate(engine: LLMEngine, prompts, params) -> list[RequestOutput]:
    outs = engine.generate(prompts, params)
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.config.num_blocks
    return outs


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("steps", [2, 3, 8])
def test_bursts_give_the_outputs_of_single_steps(steps, overlap):
    reference = _generate(make_engine(_config(n_parallel=4)), PROMPTS, PARAMS)
    engine = make_engine(_config(n_parallel=4), overlap=overlap, decode_steps=steps)
    outs = _generate(engine, PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == [_key(o) for o in reference]
    runner = engine.model_runner
    assert runner.bursts and max(runner.bursts) == steps
    # one request uses the repeat penalty, which reads the history: never in a burst
    penalised = f"req-{next(i for i, p in enumerate(PARAMS) if p.repeat_penalty != 1.0)}"
    assert all(penalised not in ids for ids in runner.burst_requests)


class ChainingRunner(FakeKVRunner):
    """FakeKVRunner that takes `launch(step, num_steps, after=handle)`: a chained burst starts
    from the tokens `after` sampled, before the engine has appended them (as on the GPU)."""

    supports_chained_bursts = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.chained: list[int] = []  # num_steps of each chained burst

    def launch(self, step, num_steps: int = 1, after=None) -> _Ready:
        if after is None:
            return _Ready(self.execute_model(step, num_steps))
        self.chained.append(num_steps)
        self.log.append(step)
        ahead = {rid: t if isinstance(t, list) else [t] for rid, t in after.result().items()}
        return _Ready(self._burst(step, num_steps, ahead))


@pytest.mark.parametrize("steps", [2, 3, 8])
def test_chained_bursts_give_the_outputs_of_single_steps(steps):
    """Bursts queued behind the running one (fed its tokens on the device) change nothing a
    user sees, with EOG, max_tokens, ctx_size and a waiting request among them."""
    reference = _generate(make_engine(_config(n_parallel=4)), PROMPTS, PARAMS)
    engine = make_engine(_config(n_parallel=4), ChainingRunner(_config(n_parallel=4)),
                         overlap=True, decode_steps=steps)  # fmt: skip
    outs = _generate(engine, PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == [_key(o) for o in reference]
    assert engine.model_runner.chained


def test_a_chained_burst_needs_overlap_and_a_runner_that_takes_it():
    config = _config()
    assert make_engine(config, ChainingRunner(config), overlap=True, decode_steps=4)._chain
    assert not make_engine(config, ChainingRunner(config), overlap=False, decode_steps=4)._chain
    assert not make_engine(config, ChainingRunner(config), overlap=True, decode_steps=1)._chain
    assert not make_engine(config, FakeKVRunner(config), overlap=True, decode_steps=4)._chain


def test_a_chained_burst_follows_a_burst_with_positions_after_it():
    config = _config()
    engine = make_engine(config, ChainingRunner(config), overlap=True, decode_steps=4)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    outs = _generate(engine, [], [])
    assert outs == []
    runner = engine.model_runner
    # the prompt (samples 1), 7 bursts of 4, each after the first queued behind the one before
    # it, then one step for the 30th token (a 1-step burst is not chained)
    assert runner.bursts == [4] * 7 and runner.chained == [4] * 6
    starts = [step.scheduled[0].start_pos for step in runner.log]
    assert starts == [0] + [3 + 4 * i for i in range(8)]


def test_no_chain_while_a_request_waits_and_an_abort_drops_its_tokens():
    config = _config(n_parallel=2)
    runner = ChainingRunner(config)
    engine = make_engine(config, runner, overlap=True, decode_steps=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    a = engine.add_request([1, 2, 3], greedy)
    b = engine.add_request([4, 5], greedy)
    engine.step(), engine.step(), engine.step()  # prompts, a burst, a chained burst queued
    assert runner.chained
    engine.abort_request(a)
    c = engine.add_request([6], greedy)  # waits: the queued burst runs, nothing more is chained
    chained = len(runner.chained)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            prev = outs.get(out.request_id)
            outs[out.request_id] = out if prev is None else prev.merge(out)
        if engine.num_waiting:
            assert len(runner.chained) == chained
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == config.num_blocks
    assert outs[a].finish_reason == "abort" and outs[b].num_output_tokens == 40
    ref = _generate(make_engine(config), [[6]], greedy)[0]
    assert _key(outs[c]) == _key(ref)


def test_tokens_arrive_in_bursts_that_add_up():
    engine = make_engine(_config(), decode_steps=4)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True))
    deltas: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        deltas.extend(engine.step())
    # the prompt step samples one token; then bursts of 4, the last only as long as max_tokens
    # needs (no steps computing tokens that would be dropped)
    assert [len(d.new_token_ids) for d in deltas] == [1, 4, 4, 2]
    assert [d.num_output_tokens for d in deltas] == [1, 5, 9, 11]
    assert deltas[-1].finish_reason == "length"
    assert engine.model_runner.bursts == [4, 4, 2]


def _script_outputs(script, steps, overlap, **params) -> tuple:
    runner = ScriptRunner({"r": script + [script[-1]] * 16})
    engine = make_engine(_config(), runner, overlap=overlap, decode_steps=steps)
    engine.add_request([1, 2], SamplingParams(temperature=0.0, **params), request_id="r")
    merged = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            merged = out if merged is None else merged.merge(out)
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.config.num_blocks
    return _key(merged), engine.scheduler.requests


SCRIPTS = [
    # stop string "</s>" completed by the 7th token: the tokens after it are dropped
    ([8, 5, 12, 29, 24, 29, 30, 1, 1, 1], {"stop": ["</s>"], "max_tokens": 20}),
    ([1, 31, 2, 3, 4, 5], {"stop": ["bb"], "max_tokens": 10}),  # a stop inside one token
    ([1, 2, 3, 4, 5, 6], {"stop": ["cd", "bc"], "max_tokens": 10}),
    ([1, 29, 5, 5], {"stop": ["</s>"], "max_tokens": 2}),  # held text flushed by max_tokens
    ([1, 29, 30, 5], {"stop": ["</s>"], "max_tokens": 3}),  # stop on the last allowed token
    ([1, 2, 3, 28, 5], {"max_tokens": 4}),  # detokenizer's held 'é' flushed at the end
    ([1, 2, 3, EOG, 2, 2], {"max_tokens": 9}),  # EOG inside a burst
    ([1, 2, 3, EOG, 2, 2, 2], {"max_tokens": 6, "ignore_eos": True}),
    ([1] * 80, {"max_tokens": 100}),  # ctx_size (64) ends it
    ([3, 4, 5, 6, 7, 8, 9, 10, 11], {"max_tokens": 7, "stop": ["gh"]}),
]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("case", range(len(SCRIPTS)))
def test_text_stops_and_limits_inside_bursts_match_single_steps(case, steps, overlap):
    script, params = SCRIPTS[case]
    expected, _ = _script_outputs(script, 1, overlap, **params)
    got, live = _script_outputs(script, steps, overlap, **params)
    assert got == expected and not live


def test_ctx_size_caps_the_burst():
    runner = FakeKVRunner(config := _config())
    engine = make_engine(config, runner, decode_steps=8)
    engine.add_request([1] * 58, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    out = _generate(engine, [], [])  # drain
    assert out == []
    # prompt 58 + 1 sampled at prefill; then the context has room for 5 positions, 64 in all
    assert runner.bursts == [5]


def test_no_burst_while_a_waiting_request_could_be_admitted():
    config = _config(n_parallel=2, batch_size=8, ubatch_size=8)
    engine = make_engine(config, decode_steps=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    engine.add_request([1, 2, 3], greedy)
    engine.step()  # prefill of the first request
    engine.add_request([4] * 8, greedy)  # arrives while the first decodes: admitted next step
    engine.step()
    assert engine.model_runner.bursts == []
    assert engine.num_running == 2


def test_a_waiting_request_gets_the_first_slot_that_frees():
    """With every slot taken, a burst stops at the step where a sequence reaches max_tokens, so
    the waiting request is admitted the step after, not up to a whole burst later."""
    config = _config(n_parallel=2)
    engine = make_engine(config, decode_steps=8)
    for prompt, max_tokens in (([1, 2, 3], 4), ([4, 5], 30), ([6, 7], 5)):
        engine.add_request(prompt, SamplingParams(temperature=0.0, ignore_eos=True,
                                                  max_tokens=max_tokens))  # fmt: skip
    engine.step()  # both prompts: one token each, the third request waits for a slot
    assert engine.num_waiting == 1
    engine.step()  # a burst of 3 brings the first request to its 4 tokens
    assert engine.model_runner.bursts == [3]
    engine.step()  # so the waiting one is admitted at once
    assert engine.num_waiting == 0 and engine.num_running == 2


def test_a_full_cache_falls_back_to_single_steps():
    # 16 blocks of 4 tokens and two 26-token prompts. An 8-step burst of both would need 9 blocks
    # each (positions up to 33); one step at a time they fit, because the first request ends (8
    # blocks) before the second needs its 9th. So they decode in single steps, and the second
    # bursts only once it runs alone.
    config = _config(n_parallel=2, cache_size=64, ctx_size=64)
    engine = make_engine(config, decode_steps=8)
    prompts = [[5] * 26, [6] * 26]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 10)]
    reference = _generate(make_engine(config), prompts, params)
    outs = _generate(engine, prompts, params)
    assert [_key(o) for o in outs] == [_key(o) for o in reference]
    runner = engine.model_runner
    assert runner.burst_requests and all(ids == {"req-1"} for ids in runner.burst_requests)


def test_num_scheduler_steps_is_validated_and_read():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineConfig(num_scheduler_steps=0)
    engine = LLMEngine(FakeKVRunner(c := _config(num_scheduler_steps=5)), None, c)
    assert engine.decode_steps == 5

    class NoBursts(FakeKVRunner):
        supports_decode_bursts = False

    assert LLMEngine(NoBursts(c), None, c).decode_steps == 1


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)


def test_model_runner_bursts_equal_single_steps_on_the_cpu(tiny_path):
    """The real runner and model: a burst feeds each step's sampled tokens (greedy and seeded)
    to the next through the paged cache exactly as separate steps do."""
    from llcuda.engine.loader import load

    prompts = [[300 + i for i in range(n)] for n in (5, 12, 1)]
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10)]  # fmt: skip
    results = {}
    for steps, chained in ((1, False), (4, False), (4, True)):
        config = EngineConfig(ctx_size=64, n_parallel=4, block_size=8, device="cpu",
                              gpu_layers=0, num_scheduler_steps=steps)  # fmt: skip
        loaded = load(str(tiny_path), config, verbose=False)
        try:
            engine = loaded.llm_engine
            if chained:  # what a GPU does: bursts queued behind bursts, fed on the device
                engine = LLMEngine(engine.model_runner, engine.tokenizer, config, overlap=True)
                assert engine._chain
            assert engine.decode_steps == steps
            results[steps, chained] = [_key(o) for o in _generate(engine, prompts, params)]
        finally:
            loaded.close()
    assert results[4, False] == results[4, True] == results[1, False]
    assert [len(r[0]) for r in results[1, False]][:2] == [9, 12]
