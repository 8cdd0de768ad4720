"""Tensor parallelism: one model split over several processes (EngineConfig.tensor_parallel_size).

    sharding.py  which slice of each GGUF tensor a rank holds (ShardPlan), checked up front
    model.py     the shared decoder on one rank: row-parallel all-reduces, vocab-parallel ends
    group.py     the ranks' process groups (gloo control channel, NCCL or gloo for tensors)
    runner.py    rank 0's ModelRunner (ships each step) and the workers' loop
    launch.py    start-up and shutdown: spawn, load, meet, fail clearly
"""
