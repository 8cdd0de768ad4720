"""Log-probs of sampled tokens (SamplingParams.logprobs) on the real model code, CPU.

The reported numbers must be the model's log_softmax for the same prefix (checked teacher-forced:
the whole sequence through the model with a private cache, tests/models/forward_helpers.py),
the alternatives its true top-k, and asking for them must change
no sampled token, in a batch where other rows do not ask, in decode bursts as in single steps.

The tiny synthetic Gemma 3 repeats its last token with a logit margin of ~700 (random weights,
tied embeddings): its head is scaled down here so that the distribution has a shape to check
and temperature sampling picks other tokens too.
"""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import LLMEngine
from llcuda.engine.loader import load
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.runner.logprobs import LogprobRows, compute_logprobs, unpack_logprobs
from llcuda.sampling_params import MAX_LOGPROBS, SamplingParams
from tests.models.forward_helpers import sequence_logits

HEAD_SCALE = 1 / 200  # logits' spread ~0.4 nats, the repeated token ~5 nats above the rest
PROMPTS = [[2, 17, 301, 44, 9], [2, 55, 60], [2, 800, 801, 802, 803, 804, 805, 806, 807], [2, 9]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)


pytestmark = pytest.mark.usefixtures("exact_cpu_decode")


class Engine:
    """A CPU engine on the tiny model with its head scaled; records every logits row."""

    def __init__(self, path, decode_steps: int = 1) -> None:
        config = EngineConfig(ctx_size=96, n_parallel=4, batch_size=96, ubatch_size=32,
                              block_size=8, device="cpu", gpu_layers=0,
                              enable_prefix_caching=False,
                              num_scheduler_steps=decode_steps)  # fmt: skip
        self.loaded = load(str(path), config, verbose=False)
        self.engine = self.loaded.llm_engine
        model = self.engine.model_runner.model
        compute_logits = model.compute_logits
        self.recorded: list[torch.Tensor] = []

        def scaled(hidden):  # [n, hidden_size] -> [n, vocab]
            logits = compute_logits(hidden) * HEAD_SCALE
            self.recorded.append(logits.detach().clone())
            return logits

        model.compute_logits = scaled

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def reference_logprobs(self, prompt: list[int], output: list[int]) -> torch.Tensor:
        """log_softmax of the logits that predict each output token, the sequence fed straight
        through the model (no engine): [len(output), vocab]."""
        ids = prompt + output
        positions = list(range(len(prompt) - 1, len(ids) - 1))
        model = self.engine.model_runner.model
        return sequence_logits(model, ids, positions, chunk=16, block_size=8).log_softmax(-1)

    def close(self) -> None:
        self.loaded.close()


@pytest.fixture(scope="module")
def single(tiny_path):
    engine = Engine(tiny_path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def bursts(tiny_path):
    engine = Engine(tiny_path, decode_steps=4)
    yield engine
    engine.close()


# --- the device computation -------------------------------------------------------------------


def test_packed_logprobs_are_log_softmax_and_true_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen) * 3  # [num_seqs, vocab]
    tokens = torch.tensor([3, 7, 11, 0, 49])
    params = [SamplingParams(logprobs=lp) for lp in (None, 0, None, 3, 7)]
    rows = LogprobRows.of(params)
    assert rows.rows == [1, 3, 4] and rows.ks == [0, 3, 7]
    packed = compute_logprobs(logits, tokens, rows)  # [3, 1 + 2 * 7]
    assert packed.shape == (3, 15)
    got = unpack_logprobs([packed.tolist()], [tokens.tolist()], rows, ["a", "b", "c", "d", "e"])
    assert sorted(got) == ["b", "d", "e"]
    ref = logits.log_softmax(dim=-1)
    for rid, row, k in (("b", 1, 0), ("d", 3, 3), ("e", 4, 7)):
        (lp,) = got[rid]
        assert lp.token_id == tokens[row]
        assert lp.logprob == pytest.approx(ref[row, tokens[row]].item(), abs=1e-6)
        values, ids = ref[row].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_top_k_beyond_the_vocabulary_is_the_whole_vocabulary():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    rows = LogprobRows.of([SamplingParams(logprobs=20)])
    packed = compute_logprobs(logits, torch.tensor([0]), rows)
    (lp,) = unpack_logprobs([packed.tolist()], [[0]], rows, ["a"])["a"]
    assert [t for t, _ in lp.top] == [2, 1, 0]
    assert LogprobRows.of([SamplingParams(), SamplingParams()]) is None  # nobody asks: no work


def test_a_runner_that_reports_no_logprobs_refuses_them_at_submission():
    from tests.unit.test_llm_engine import _config, make_engine

    engine = make_engine(_config(n_parallel=2))  # a fake runner: tokens only
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request([1, 2, 3], SamplingParams(logprobs=1))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, True, 1.5, "5"])
def test_logprobs_must_be_a_small_non_negative_integer(value):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=value)


# --- the engine ---------------------------------------------------------------------------------


def _check_against_reference(engine: Engine, prompt, out, k):
    assert len(out.new_logprobs) == len(out.new_token_ids)
    refs = engine.reference_logprobs(prompt, out.new_token_ids)  # [num_tokens, vocab]
    for i, lp in enumerate(out.new_logprobs):
        assert lp.token_id == out.new_token_ids[i]
        ref = refs[i]  # [vocab]
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
        values, ids = ref.topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
        tops = [v for _, v in lp.top]
        assert tops == sorted(tops, reverse=True)
        for t, v in lp.top:
            if t == lp.token_id:
                assert v == lp.logprob


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_logprobs_are_the_reference_log_softmax_of_each_prefix(single, temperature):
    params = SamplingParams(max_tokens=6, temperature=temperature, top_k=0, top_p=1.0,
                            min_p=0.0, seed=3, logprobs=5, ignore_eos=True)  # fmt: skip
    (out,) = single.generate([PROMPTS[0]], params)
    _check_against_reference(single, PROMPTS[0], out, 5)
    if temperature == 0.0:  # greedy: the chosen token is the most likely one
        assert all(lp.top[0] == (lp.token_id, lp.logprob) for lp in out.new_logprobs)
    else:  # the scaled head spreads the distribution: sampling leaves the argmax sometimes
        assert any(lp.top[0][0] != lp.token_id for lp in out.new_logprobs)


def _mixed_params(with_logprobs: bool) -> list[SamplingParams]:
    ks = [0, None, 20, None] if with_logprobs else [None] * 4
    temps = [0.0, 1.0, 1.0, 0.7]
    return [SamplingParams(max_tokens=7, temperature=t, top_k=0, top_p=1.0, min_p=0.0,
                           seed=10 + i, logprobs=k, ignore_eos=True)
            for i, (t, k) in enumerate(zip(temps, ks, strict=True))]  # fmt: skip


def test_mixed_batch_gives_the_tokens_of_a_batch_without_logprobs(single, bursts):
    reference = single.generate(PROMPTS, _mixed_params(False))
    assert all(o.new_logprobs is None for o in reference)
    outs = single.generate(PROMPTS, _mixed_params(True))
    assert [o.new_token_ids for o in outs] == [o.new_token_ids for o in reference]
    assert [o.new_logprobs is not None for o in outs] == [True, False, True, False]
    assert [len(lp.top) for lp in outs[0].new_logprobs] == [0] * 7
    assert [len(lp.top) for lp in outs[2].new_logprobs] == [20] * 7
    # decode bursts carry log-probs: the same tokens and numbers as single steps
    burst_outs = bursts.generate(PROMPTS, _mixed_params(True))
    assert [o.new_token_ids for o in burst_outs] == [o.new_token_ids for o in reference]
    for a, b in zip(outs, burst_outs, strict=True):
        if a.new_logprobs is None:
            assert b.new_logprobs is None
            continue
        assert [lp.token_id for lp in b.new_logprobs] == b.new_token_ids
        assert [lp.logprob for lp in b.new_logprobs] == pytest.approx(
            [lp.logprob for lp in a.new_logprobs], abs=1e-4
        )
        assert [[t for t, _ in lp.top] for lp in b.new_logprobs] == [
            [t for t, _ in lp.top] for lp in a.new_logprobs
        ]


def test_a_burst_cut_by_a_stop_string_keeps_one_logprob_per_kept_token(bursts):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                            seed=5, logprobs=2, ignore_eos=True)  # fmt: skip
    (free,) = bursts.generate([PROMPTS[1]], params)
    text = bursts.engine.tokenizer.decode(free.new_token_ids)
    assert len(text) > 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # met in the middle of some burst
    (out,) = bursts.generate([PROMPTS[1]], SamplingParams(**{**params.__dict__, "stop": [stop]}))
    assert out.finish_reason == "stop"
    assert len(out.new_token_ids) < len(free.new_token_ids)
    assert out.new_token_ids == free.new_token_ids[: len(out.new_token_ids)]
    assert [lp.token_id for lp in out.new_logprobs] == out.new_token_ids
    assert out.new_logprobs == free.new_logprobs[: len(out.new_token_ids)]


class _CountingRunner:
    """The model runner, counting the bursts launched behind a running one."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.chained = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def launch(self, step, num_steps=1, after=None):
        self.chained += after is not None
        return self._runner.launch(step, num_steps, after=after)


def test_chained_bursts_with_overlap_keep_the_logprobs_of_single_steps(single, bursts):
    """The GPU's schedule on the CPU runner: text made one step late (overlap) and bursts
    queued behind the running one, fed its tokens (chained); a stop string cuts one."""
    engine = bursts.engine
    runner = _CountingRunner(engine.model_runner)
    chained = LLMEngine(runner, engine.tokenizer, engine.config, overlap=True, decode_steps=4,
                        enable_prefix_caching=False)  # fmt: skip
    params = _mixed_params(True)
    reference = single.generate(PROMPTS, params)
    text = single.engine.tokenizer.decode(reference[2].new_token_ids)
    params[2].stop = [text[len(text) // 2 : len(text) // 2 + 2]]
    outs = chained.generate(PROMPTS, params)
    assert runner.chained > 0
    assert outs[2].finish_reason == "stop"
    for a, b in zip(reference, outs, strict=True):
        assert b.new_token_ids == a.new_token_ids[: len(b.new_token_ids)]
        if a.new_logprobs is None:
            assert b.new_logprobs is None
            continue
        assert [lp.token_id for lp in b.new_logprobs] == b.new_token_ids
        assert [lp.logprob for lp in b.new_logprobs] == pytest.approx(
            [lp.logprob for lp in a.new_logprobs[: len(b.new_token_ids)]], abs=1e-4
        )
