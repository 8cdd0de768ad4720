from llcuda.engine.warmup import warm_up
from tests.unit.test_llm_engine import VOCAB, _config, make_engine


def test_warm_up_runs_mixed_steps_and_leaves_the_engine_clean():
    config = _config(n_parallel=4)
    engine = make_engine(config, prefix=True)
    steps = warm_up(engine, VOCAB)
    log = engine.model_runner.log
    assert steps == len(log) > 3
    assert engine.num_steps == 0 and not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    assert engine.block_manager.prefix_cache_stats.num_requests == 0
    sizes = {sum(item.num_tokens for item in s.scheduled) for s in log}
    assert len(sizes) >= 4  # several matmul row counts
    mixed = [s for s in log if len({item.num_tokens == 1 for item in s.scheduled}) == 2]
    assert mixed, "no step mixed prefill chunks with decode tokens"


def test_warm_up_runs_a_burst_and_one_chained_behind_it():
    from tests.unit.test_decode_bursts import ChainingRunner

    config = _config(n_parallel=4)
    runner = ChainingRunner(config)
    engine = make_engine(config, runner, overlap=True, decode_steps=4)
    warm_up(engine, VOCAB)
    assert runner.bursts and runner.chained
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
