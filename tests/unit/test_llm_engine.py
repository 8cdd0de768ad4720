"""LLMEngine end to end with a deterministic fake model that keeps a real paged KV cache.

`FakeKVRunner` writes every fed token into the KV slot its block table names and computes the
next-token logits from the context it reads back through the block table. A wrong block table,
a block freed while in use or a slot overwritten by another request changes the output or trips
an assertion, so "batched == alone" really checks the paging.
"""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import LLMEngine, RequestOutput, find_stop, partial_stop_len
from llcuda.engine.scheduler import SchedulerOutput
from llcuda.runner.sampler import sample
from llcuda.sampling_params import SamplingParams

VOCAB = 32
EOG = 0
# token id -> text; 0 is the end-of-generation token (no text)
PIECES = {i: chr(ord("a") + i - 1) for i in range(1, 27)} | {
    EOG: "",
    27: " ",
    28: "é",
    29: "<",
    30: "/s>",
    31: "ab",
}


class FakeTokenizer:
    vocab_size = VOCAB
    eog_ids = frozenset({EOG})

    def encode(self, text: str) -> list[int]:
        inverse = {v: k for k, v in PIECES.items() if len(v) == 1}
        return [inverse[c] for c in text]


class FakeDetokenizer:
    """push() -> the token's text; token 28 ('é') is held back one push, as split UTF-8 is."""

    def __init__(self) -> None:
        self.held = ""

    def push(self, token_id: int) -> str:
        text = self.held + PIECES[token_id]
        if token_id == 28:
            self.held = text
            return ""
        self.held = ""
        return text

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class FakeKVRunner:
    """Next-token logits = f(context read back from a paged KV cache of token ids).

    Takes decode bursts as the model runner does (`execute_model(step, num_steps)`): each step's
    token is written into the next position's KV slot and feeds the next step.
    """

    supports_decode_bursts = True

    def __init__(self, config: EngineConfig) -> None:
        self.block_size = config.block_size
        self.slots: list[tuple[int, int] | None] = [None] * (config.num_blocks * config.block_size)
        self.log: list[SchedulerOutput] = []
        self.bursts: list[int] = []  # num_steps of each burst run
        self.burst_requests: list[set[str]] = []  # the request ids of each burst
        self.fail_next = 0  # raise from the next N calls (engine-loop failure tests)

    def _slot(self, request, pos: int) -> int:
        table = request.block_table
        assert pos // self.block_size < len(table), f"position {pos} beyond {request!r}"
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute_model(self, step: SchedulerOutput, num_steps: int = 1) -> dict:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("boom")
        self.log.append(step)
        if num_steps > 1:
            return self._burst(step, num_steps)
        for item in step.scheduled:
            r = item.request
            for pos in range(item.start_pos, item.start_pos + item.num_tokens):
                self.slots[self._slot(r, pos)] = (pos, r.all_token_ids[pos])
        rows = [item for item in step.scheduled if item.sample]
        if not rows:
            return {}
        logits = torch.stack([self._logits(self._context(x.request, x.seq_len)) for x in rows])
        reqs = [x.request for x in rows]
        tokens = sample(
            logits,
            [r.sampling_params for r in reqs],
            [r.generator for r in reqs],
            [r.all_token_ids for r in reqs],
        )
        return {r.request_id: t for r, t in zip(reqs, tokens.tolist(), strict=True)}

    def _burst(self, step: SchedulerOutput, num_steps: int,
               ahead: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
        """ahead: tokens a chained burst's requests have beyond all_token_ids (sampled by the
        burst before it, not yet appended by the engine)."""
        self.bursts.append(num_steps)
        self.burst_requests.append({x.request_id for x in step.scheduled})
        assert all(x.num_tokens == 1 and x.sample for x in step.scheduled), step
        reqs = [x.request for x in step.scheduled]
        assert all(r.sampling_params.repeat_penalty == 1.0 for r in reqs)
        ahead = ahead or {}
        # grow through the burst, as on the GPU
        seqs = [list(r.all_token_ids) + ahead.get(r.request_id, []) for r in reqs]
        known = [len(seq) for seq in seqs]
        assert all(x.start_pos == n - 1 for x, n in zip(step.scheduled, known, strict=True))
        for j in range(num_steps):
            for x, seq in zip(step.scheduled, seqs, strict=True):
                pos = x.start_pos + j
                self.slots[self._slot(x.request, pos)] = (pos, seq[pos])
            logits = torch.stack([
                self._logits(self._context(x.request, x.start_pos + j + 1, seq))
                for x, seq in zip(step.scheduled, seqs, strict=True)
            ])  # fmt: skip
            tokens = sample(logits, [r.sampling_params for r in reqs],
                            [r.generator for r in reqs], seqs)  # fmt: skip
            for seq, t in zip(seqs, tokens.tolist(), strict=True):
                seq.append(t)
        return {r.request_id: seq[n:] for r, seq, n in zip(reqs, seqs, known, strict=True)}

    def _context(self, request, n: int, tokens: list[int] | None = None) -> list[int]:
        tokens = request.all_token_ids if tokens is None else tokens
        ctx = []
        for pos in range(n):
            entry = self.slots[self._slot(request, pos)]
            assert entry is not None and entry[0] == pos, f"KV slot of position {pos} lost"
            assert entry[1] == tokens[pos], f"KV slot of position {pos} corrupted"
            ctx.append(entry[1])
        return ctx

    @staticmethod
    def _logits(ctx: list[int]) -> torch.Tensor:
        seed = 0
        for t in ctx:
            seed = (seed * 1_000_003 + t + 1) % (1 << 61)
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
        logits[EOG] += 0.5  # some requests end by EOG within a few tokens
        return logits


class ScriptRunner:
    """Returns scripted tokens: request_id -> the tokens it generates, in order (a decode burst
    gets the next num_steps of them)."""

    supports_decode_bursts = True

    def __init__(self, scripts: dict[str, list[int]]) -> None:
        self.scripts = scripts
        self.calls = 0

    def execute_model(self, step: SchedulerOutput, num_steps: int = 1) -> dict:
        self.calls += 1
        out = {}
        for x in step.scheduled:
            if x.sample:
                done = x.request.num_output_tokens
                script = self.scripts[x.request_id]
                out[x.request_id] = (script[done] if num_steps == 1
                                     else script[done : done + num_steps])  # fmt: skip
        return out


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request) -> bool:
    """Run a test with outputs made in the step that sampled them, and one step later."""
    return request.param


def _config(**kw) -> EngineConfig:
    return EngineConfig(**{"ctx_size": 64, "block_size": 4, "batch_size": 32, "ubatch_size": 8,
                           **kw})  # fmt: skip


def make_engine(
    config: EngineConfig, runner=None, prefix: bool = False, overlap: bool = False,
    decode_steps: int = 1,
) -> LLMEngine:
    runner = FakeKVRunner(config) if runner is None else runner
    return LLMEngine(
        runner, FakeTokenizer(), config, detokenizer_factory=FakeDetokenizer,
        enable_prefix_caching=prefix, overlap=overlap, decode_steps=decode_steps,
    )  # fmt: skip


PROMPTS = [
    [1, 2, 3],
    list(range(1, 27)) + [5, 5, 5],
    [7],
    [9, 9, 9, 9, 9, 9, 9, 9],
    [4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 4],
    [1, 2, 3, 4, 5],
    list(range(20, 0, -1)),
    [2] * 17,
]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=12),
    SamplingParams(temperature=0.8, seed=11, max_tokens=12),
    SamplingParams(temperature=0.0, max_tokens=20, repeat_penalty=1.3),
    SamplingParams(temperature=1.0, top_k=5, seed=3, max_tokens=15),
    SamplingParams(temperature=0.0, max_tokens=1),
    SamplingParams(temperature=0.6, top_p=0.8, seed=5, max_tokens=25, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=1.2, min_p=0.1, seed=8, max_tokens=10),
]


def _key(out: RequestOutput) -> tuple:
    return (out.new_token_ids, out.new_text, out.finish_reason, out.num_output_tokens)


@pytest.fixture(scope="module")
def alone() -> list[tuple]:
    """Each prompt run by itself in a fresh engine: the reference."""
    results = []
    for prompt, params in zip(PROMPTS, PARAMS, strict=True):
        engine = make_engine(_config(n_parallel=1))
        results.append(_key(engine.generate([prompt], params)[0]))
    return results


def test_reference_outputs_are_nontrivial(alone):
    lengths = [len(r[0]) for r in alone]
    assert max(lengths) >= 20 and lengths[4] == 1
    assert {r[2] for r in alone} >= {"length", "stop"}  # some hit EOG, some the limit


def test_batch_of_8_with_n_parallel_4_equals_each_alone(alone, overlap):
    config = _config(n_parallel=4)
    engine = make_engine(config, overlap=overlap)
    outs = engine.generate(PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == alone
    assert max(len(s.scheduled) for s in engine.model_runner.log) == 4
    assert engine.block_manager.num_free_blocks == config.num_blocks


def test_chunked_prefill_respects_ubatch_and_budget(alone, overlap):
    config = _config(n_parallel=8, batch_size=12, ubatch_size=5)
    engine = make_engine(config, overlap=overlap)
    outs = engine.generate(PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == alone
    log = engine.model_runner.log
    assert all(s.total_num_tokens <= 12 for s in log)
    assert all(x.num_tokens <= 5 for s in log for x in s.scheduled)
    assert any(s.total_num_tokens == 12 for s in log)  # the budget really binds
    # the 29-token prompt is fed in 5-token chunks, each chunk right after the previous one
    chunks = [(x.start_pos, x.num_tokens) for s in log for x in s.scheduled
              if x.request.prompt_token_ids == PROMPTS[1] and not x.sample]  # fmt: skip
    assert chunks[0] == (0, 5)
    assert all(a[0] + a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))


def test_preemption_under_a_tiny_block_pool_gives_identical_outputs(alone, overlap):
    # one context's worth of KV (16 blocks of 4) shared by up to 8 sequences
    config = _config(n_parallel=8, cache_size=64)
    engine = make_engine(config, overlap=overlap)
    outs = engine.generate(PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == alone
    assert sum(len(s.preempted_ids) for s in engine.model_runner.log) >= 3
    assert engine.block_manager.num_free_blocks == config.num_blocks


def test_prefix_caching_gives_identical_outputs_and_hits():
    prompts = [list(range(1, 20)) + [t] for t in (1, 2, 3, 4)] * 2
    params = SamplingParams(temperature=0.0, max_tokens=6)
    ref = [_key(make_engine(_config()).generate([p], params)[0]) for p in prompts]
    config = _config(n_parallel=2, cache_size=64 + 32)
    engine = make_engine(config, prefix=True)
    outs = engine.generate(prompts, params)
    assert [_key(o) for o in outs] == ref
    assert sum(o.num_cached_tokens for o in outs) >= 6 * 16
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == config.num_blocks


def test_seeded_sampling_ignores_batch_composition():
    config = _config(n_parallel=4)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42,
                            max_tokens=16, ignore_eos=True)  # fmt: skip
    solo = make_engine(config).generate([[3, 1, 4]], params)[0]
    crowd = [[1] * 7, [3, 1, 4], [2, 7, 1, 8, 2, 8], [5]]
    mixed = [SamplingParams(temperature=0.9), params, SamplingParams(temperature=0.0), params]
    outs = make_engine(config).generate(crowd, mixed)
    assert outs[1].new_token_ids == solo.new_token_ids
    unseeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16,
                              ignore_eos=True)  # fmt: skip
    # config.seed is every request's default seed, as llama.cpp's --seed
    seeded_engine = make_engine(_config(seed=42))
    assert seeded_engine.generate([[3, 1, 4]], unseeded)[0].new_token_ids == solo.new_token_ids


def test_steps_stream_deltas_that_add_up(overlap):
    engine = make_engine(_config(n_parallel=2), overlap=overlap)
    rid = engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5))
    deltas: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        deltas.extend(engine.step())
    assert all(len(d.new_token_ids) == 1 for d in deltas)
    assert [d.num_output_tokens for d in deltas] == list(range(1, len(deltas) + 1))
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    last = deltas[-1]
    assert last.request_id == rid and last.num_prompt_tokens == 3
    assert last.arrival_time <= last.first_token_time <= last.finished_time


# --- text, stop strings, EOG, max_tokens -----------------------------------------------------


def _run_script(
    script: list[int], overlap: bool = False, **params
) -> tuple[list[RequestOutput], LLMEngine]:
    # with overlap the runner may be asked for one token past a stop string: pad the script
    runner = ScriptRunner({"r": script + [script[-1]] * overlap})
    engine = make_engine(_config(), runner, overlap=overlap)
    engine.add_request([1, 2], SamplingParams(temperature=0.0, **params), request_id="r")
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert engine.block_manager.num_free_blocks == engine.config.num_blocks
    return outs, engine


def _text(outs: list[RequestOutput]) -> list[str]:
    return [o.new_text for o in outs]


def test_stop_string_is_never_emitted_and_held_back_text_is_released(overlap):
    # "h e l < x < / s > a": '<' is held until 'x' shows it is no stop; "</s>" then stops
    h, e, l, x, a = 8, 5, 12, 24, 1
    outs, _ = _run_script(
        overlap=overlap, script=[h, e, l, 29, x, 29, 30, a, a], stop=["</s>"], max_tokens=20
    )
    assert _text(outs) == ["h", "e", "l", "", "<x", "", ""]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert sum(len(o.new_token_ids) for o in outs) == 7


def test_stop_string_inside_one_token_cuts_the_text(overlap):
    outs, _ = _run_script(
        overlap=overlap, script=[1, 31, 2, 3], stop=["bb"], max_tokens=10
    )  # a, ab, b -> "aab|b"
    assert "".join(_text(outs)) == "aa" and outs[-1].finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins(overlap):
    c, d = 3, 4
    outs, _ = _run_script(overlap=overlap, script=[1, 2, c, d, 5], stop=["cd", "bc"], max_tokens=10)
    assert "".join(_text(outs)) == "a" and outs[-1].finish_reason == "stop"


def test_partial_stop_is_flushed_when_max_tokens_ends_the_request(overlap):
    outs, _ = _run_script(overlap=overlap, script=[1, 29], stop=["</s>"], max_tokens=2)
    assert _text(outs) == ["a", "<"]
    assert outs[-1].finish_reason == "length"


def test_stop_string_on_the_last_allowed_token_reports_stop(overlap):
    outs, _ = _run_script(overlap=overlap, script=[1, 29, 30], stop=["</s>"], max_tokens=3)
    assert "".join(_text(outs)) == "a" and outs[-1].finish_reason == "stop"


def test_detokenizer_held_text_is_flushed_at_the_end(overlap):
    outs, _ = _run_script(
        overlap=overlap, script=[1, 28], max_tokens=2
    )  # 'é' held by the detokenizer until flush
    assert _text(outs) == ["a", "é"]


def test_eog_stops_without_text_unless_ignore_eos(overlap):
    outs, _ = _run_script(overlap=overlap, script=[1, EOG, 2], max_tokens=5)
    assert _text(outs) == ["a", ""] and outs[-1].new_token_ids == [EOG]
    assert outs[-1].finish_reason == "stop" and outs[-1].num_output_tokens == 2
    outs, _ = _run_script(overlap=overlap, script=[1, EOG, 2], max_tokens=3, ignore_eos=True)
    assert "".join(_text(outs)) == "ab" and outs[-1].finish_reason == "length"


def test_max_tokens_zero_finishes_at_once_without_running_the_model():
    runner = ScriptRunner({})
    engine = make_engine(_config(), runner)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=0))
    assert engine.has_unfinished_requests()
    (out,) = engine.step()
    assert (out.request_id, out.finished, out.finish_reason) == (rid, True, "length")
    assert out.new_token_ids == [] and out.num_output_tokens == 0 and out.num_prompt_tokens == 3
    assert runner.calls == 0 and not engine.has_unfinished_requests()


def test_ctx_size_ends_with_length(overlap):
    outs, engine = _run_script(overlap=overlap, script=[1] * 70, max_tokens=100)
    # prompt 2 + 62 generated = ctx_size 64
    assert engine.config.ctx_size == 64
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 62


def test_abort_frees_blocks_now_and_reports_once(overlap):
    config = _config(n_parallel=2)
    engine = make_engine(config, overlap=overlap)
    a = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request([6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < config.num_blocks
    assert engine.abort_request(a) and engine.abort_request(b)
    assert not engine.abort_request(a) and not engine.abort_request("nope")
    assert engine.block_manager.num_free_blocks == config.num_blocks
    outs = engine.step()
    assert {(o.request_id, o.finished, o.finish_reason) for o in outs} == {
        (a, True, "abort"),
        (b, True, "abort"),
    }
    assert engine.step() == [] and not engine.has_unfinished_requests()


def test_add_request_validation():
    engine = make_engine(_config(ctx_size=16))
    p = SamplingParams()
    with pytest.raises(ValueError, match="prompt has 16 tokens but ctx_size is 16"):
        engine.add_request([1] * 16, p)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([], p)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, VOCAB], p)
    with pytest.raises(ValueError, match="non-negative ints"):
        engine.add_request([1, -1], p)
    with pytest.raises(ValueError, match="list of token ids"):
        engine.add_request("hello", p)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request([1], {"temperature": 0})
    engine.add_request([1], p, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], p, request_id="x")
    # vLLM's order (request_id, prompt, params) works too
    assert engine.add_request("y", [1, 2], p) == "y"
    assert set(engine.scheduler.requests) == {"x", "y"}


def test_stop_helpers():
    assert find_stop("abc</s>def</s>", ["</s>"]) == 3
    assert find_stop("abc", ["x"]) == -1
    assert partial_stop_len("abc</", ["</s>"]) == 2
    assert partial_stop_len("abc<", ["</s>", "<|end|>"]) == 1
    assert partial_stop_len("abc", ["</s>"]) == 0
    assert partial_stop_len("xx", ["xxx"]) == 2
