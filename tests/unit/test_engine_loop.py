"""EngineLoop: the background stepping thread, request handles, aborts, failures, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from llcuda.engine.engine_loop import EngineLoop, EngineStepError
from llcuda.sampling_params import SamplingParams
from tests.unit.test_llm_engine import PARAMS, PROMPTS, FakeKVRunner, _config, make_engine

LONG = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)


class SlowRunner(FakeKVRunner):
    """Sleeps in every step so that requests are still running when a test acts."""

    def __init__(self, config, delay: float = 0.005) -> None:
        super().__init__(config)
        self.delay = delay

    def execute_model(self, step):
        time.sleep(self.delay)
        return super().execute_model(step)


def _reference() -> list[tuple]:
    engine = make_engine(_config(n_parallel=4))
    return [
        (o.new_token_ids, o.new_text, o.finish_reason) for o in engine.generate(PROMPTS, PARAMS)
    ]


def _key(out) -> tuple:
    return (out.new_token_ids, out.new_text, out.finish_reason)


@pytest.fixture
def loop():
    loops = []

    def make(config=None, runner=None, **kw) -> EngineLoop:
        config = config or _config(n_parallel=4, ctx_size=256)
        lp = EngineLoop(make_engine(config, runner), **kw)
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        lp.shutdown(timeout=10)


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llcuda-engine-loop" and t.is_alive()]


def test_threaded_results_equal_the_synchronous_engine(loop):
    lp = loop(_config(n_parallel=4))
    handles = [lp.submit(p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]
    # one handle streamed, the others awaited
    deltas = list(handles[0])
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.new_token_ids] == handles[0].result().new_token_ids
    assert [_key(h.result(timeout=30)) for h in handles] == _reference()
    bm = lp.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_generate_and_concurrent_submitters(loop):
    lp = loop(_config(n_parallel=4))
    results: dict[int, tuple] = {}

    def client(i: int) -> None:
        results[i] = _key(lp.submit(PROMPTS[i], PARAMS[i]).result(timeout=30))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [results[i] for i in range(len(PROMPTS))] == _reference()
    assert [_key(o) for o in lp.generate(PROMPTS, PARAMS)] == _reference()


def test_submit_validates_synchronously(loop):
    lp = loop()
    with pytest.raises(ValueError, match="prompt has 300 tokens but ctx_size is 256"):
        lp.submit([1] * 300, SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        lp.submit([], SamplingParams())


def test_abort_ends_the_stream_and_frees_blocks(loop):
    config = _config(n_parallel=4, ctx_size=256)
    lp = loop(config, SlowRunner(config))
    handle = lp.submit([1, 2, 3], LONG)
    other = lp.submit([4, 5], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    stream = iter(handle)
    first = next(stream)
    assert first.new_token_ids and not first.finished
    handle.abort()
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert handle.result().finish_reason == "abort"
    assert other.result(timeout=30).num_output_tokens == 5
    handle.abort()  # finished: nothing happens
    deadline = time.monotonic() + 10
    bm = lp.engine.block_manager
    while bm.num_free_blocks != bm.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bm.num_free_blocks == bm.num_blocks


def test_step_failure_reaches_every_waiting_handle_and_the_loop_recovers(loop):
    config = _config(n_parallel=2)
    runner = SlowRunner(config)
    lp = loop(config, runner)
    handles = [lp.submit([1, 2, 3], LONG) for _ in range(3)]  # 2 running, 1 waiting
    next(iter(handles[0]))  # the first step went through
    runner.fail_next = 1
    for h in handles:
        with pytest.raises(EngineStepError, match="RuntimeError: boom") as info:
            h.result(timeout=30)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(EngineStepError):
            list(h)
    bm = lp.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    # later requests run normally on the same loop
    out = lp.submit(PROMPTS[0], PARAMS[0]).result(timeout=30)
    assert _key(out) == _reference()[0]


def test_loop_sleeps_when_idle(loop):
    lp = loop(_config())
    lp.submit([1, 2], SamplingParams(max_tokens=3)).result(timeout=30)
    steps = lp.engine.num_steps
    time.sleep(0.1)
    assert lp.engine.num_steps == steps
    assert lp.submit([1, 2], SamplingParams(max_tokens=3)).result(timeout=30).finished


def test_shutdown_aborts_everything_and_joins(loop):
    config = _config(n_parallel=2, ctx_size=256)
    lp = loop(config, SlowRunner(config))
    handles = [lp.submit([1, 2, 3], LONG) for _ in range(4)]  # 2 running, 2 waiting
    next(iter(handles[0]))
    assert _engine_threads()
    lp.shutdown(timeout=10)
    assert not lp.is_threaded
    for h in handles:
        out = h.result(timeout=1)
        assert out.finished and out.finish_reason == "abort"
        assert list(h)[-1].finish_reason == "abort"  # the stream ends with it too
    bm = lp.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    with pytest.raises(RuntimeError, match="shut down"):
        lp.submit([1], SamplingParams())
    lp.shutdown()  # idempotent


def test_without_thread_handles_drive_the_engine(loop):
    before = len(_engine_threads())
    lp = loop(_config(n_parallel=4), auto_start=False)
    assert not lp.is_threaded and len(_engine_threads()) == before
    handles = [lp.submit(p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]
    streamed = list(handles[3])  # iterating steps the whole batch in this thread
    assert streamed[-1].finished
    assert [_key(h.result()) for h in handles] == _reference()
    assert not lp.run_once()  # nothing left


def test_without_thread_run_until_complete_and_abort(loop):
    lp = loop(_config(n_parallel=2), auto_start=False)
    keep = lp.submit(PROMPTS[0], PARAMS[0])
    drop = lp.submit([1, 2, 3], LONG)
    lp.run_once()
    drop.abort()  # applied at once: no thread would pick it up
    bm = lp.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks - len(keep_request_blocks(lp))
    lp.run_until_complete()
    assert drop.finished and drop.result().finish_reason == "abort"
    assert _key(keep.result()) == _reference()[0]
    lp.start()  # a thread can be started later
    assert lp.is_threaded
    assert lp.submit([5, 6], SamplingParams(max_tokens=2)).result(timeout=30).finished


def keep_request_blocks(lp: EngineLoop) -> list[int]:
    return [b for r in lp.engine.scheduler.requests.values() for b in r.block_table]


def test_abort_from_inside_a_step_does_not_deadlock(loop):
    # a TextStream dropped mid-step aborts from __del__, in the stepping thread itself
    config = _config(n_parallel=2)
    runner = FakeKVRunner(config)
    lp = loop(config, runner, auto_start=False)
    victim = lp.submit([1, 2, 3], LONG)
    keep = lp.submit([4, 5], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    original = runner.execute_model

    def execute_and_abort(step):
        victim.abort()  # re-entrant: the step lock is held by this thread
        return original(step)

    runner.execute_model = execute_and_abort
    assert keep.result().num_output_tokens == 4
    assert victim.result().finish_reason == "abort"


class _Fatal(BaseException):
    """Not an Exception: escapes run_once and kills the loop thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_loop_thread_fails_handles_instead_of_hanging(loop):
    config = _config(n_parallel=2)
    runner = SlowRunner(config)
    lp = loop(config, runner)
    handle = lp.submit([1, 2, 3], LONG)
    next(iter(handle))

    def fatal(step):
        raise _Fatal("loop bug")

    runner.execute_model = fatal
    with pytest.raises(EngineStepError, match="loop bug"):
        handle.result(timeout=30)
    deadline = time.monotonic() + 10
    while lp.is_threaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lp.is_threaded
    with pytest.raises(RuntimeError, match="thread died"):
        lp.submit([1], SamplingParams())


def test_listen_hands_over_every_delta_in_order(loop):
    """A listener gets the deltas queued before it was set, then the rest, on the stepper."""
    config = _config(n_parallel=2)
    lp = loop(config, SlowRunner(config))
    handle = lp.submit(PROMPTS[0], PARAMS[0])
    first = next(iter(handle))  # one delta consumed by iteration; later ones queue or listen
    got, done = [], threading.Event()

    def listener(item):
        got.append(item)
        if isinstance(item, BaseException) or item.finished:
            done.set()

    time.sleep(0.05)  # let a few deltas queue up before the listener exists
    handle.listen(listener)
    assert done.wait(30)
    tokens = first.new_token_ids + [t for d in got for t in d.new_token_ids]
    assert tokens == handle.result().new_token_ids
    assert got[-1].finished and all(not d.finished for d in got[:-1])


def test_listen_receives_the_step_failure(loop):
    config = _config(n_parallel=2)
    runner = SlowRunner(config)
    lp = loop(config, runner)
    handle = lp.submit([1, 2, 3], LONG)
    got, done = [], threading.Event()
    handle.listen(lambda item: (got.append(item), done.set()) if isinstance(item, BaseException)
                  else got.append(item))
    runner.fail_next = 1
    assert done.wait(30)
    assert isinstance(got[-1], EngineStepError)
