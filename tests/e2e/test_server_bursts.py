"""The server over an engine that decodes in bursts (num_scheduler_steps=4, which a GPU runs at
16): deltas then carry several tokens each, and streaming, stop strings, usage, disconnects and
a queue at 4x n_parallel must behave exactly as with one token per step. The tests are
test_server's own, run against this module's server."""

from __future__ import annotations

import pytest

from tests.e2e import test_server as one_step
from tests.e2e.conftest import start_server


@pytest.fixture(scope="module")
def server(tiny_model):
    yield from start_server(tiny_model, num_scheduler_steps=4)


def test_the_engine_decodes_in_bursts(server):
    llm = server.llm_engine
    assert llm.decode_steps == 4
    steps = llm.num_steps
    out = server.engine.infer("Once upon", max_tokens=9, temperature=0.0, ignore_eos=True)
    assert out.tokens_generated == 9
    # the prompt step samples the first token; then bursts of 4 and 4: three engine steps,
    # counted as the 1 + 4 + 4 decode steps they ran
    assert llm.num_steps - steps == 9


# test_server's tests, collected here again: they take this module's `server`
for _name in ("test_completion_matches_the_engine", "test_streamed_completion_equals_the_whole_one",
              "test_chat_completion_and_stream", "test_stop_string_ends_the_completion",
              "test_disconnect_mid_stream_aborts_and_frees_kv",
              "test_concurrent_streams_all_complete",
              "test_many_requests_at_4x_n_parallel_none_lost"):
    globals()[_name] = getattr(one_step, _name)
