"""Start a tensor-parallel model: rank 0 in this process (with the scheduler), ranks 1..tp-1 in
processes of their own (torch.multiprocessing, spawn), one GPU each (NCCL) or all on the CPU
(gloo).

Start-up order, so that no rank waits on a dead one: rank 0 checks that every tensor splits
(before anything starts), spawns the workers, loads its part; each worker loads its part and
reports "ready" (or its traceback) on a queue; once all are ready every rank meets the others in
the process group. Each wait is bounded: a worker that dies or stalls is an error on rank 0 that
names it, and the other workers are stopped.
"""

from __future__ import annotations

import dataclasses
import os
import queue as queue_module
import time
import traceback

import torch
import torch.multiprocessing as mp

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.memory_plan import check_fits, plan_gpu_memory, use_expandable_segments
from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.layers.weight_staging import staging_scope
from llcuda.models.decoder import DecoderForCausalLM
from llcuda.models.registry import MODELS
from llcuda.parallel.group import TensorParallelGroup, create_store
from llcuda.parallel.model import TensorParallelDecoder
from llcuda.parallel.runner import TensorParallelRunner, worker_loop
from llcuda.parallel.sharding import ShardPlan
from llcuda.runner.model_runner import ModelRunner

# How long a worker may take to load its shard (a 27B model's from a cold disk takes minutes;
# a worker that dies meanwhile is an error at once), and by default each collective
# (EngineConfig.extra "tp_timeout_s" overrides the latter).
START_TIMEOUT_S = 600.0
DEFAULT_TIMEOUT_S = 600.0
# How long the ranks may take to meet once all are loaded (seconds on a busy host): separate
# from the collective timeout, which a test may set to a second
CONNECT_TIMEOUT_S = 60.0


def rank_device(config: EngineConfig, rank: int, num_layers: int) -> torch.device:
    """Rank `rank`'s device: cuda:rank when the model runs on GPUs, else the CPU."""
    wanted = config.device
    if wanted is None:
        wanted = "cuda" if torch.cuda.is_available() and config.gpu_layers > 0 else "cpu"
    if wanted.startswith("cpu"):
        return torch.device("cpu")
    if config.gpu_layers <= num_layers:
        raise ValueError(
            f"tensor_parallel_size {config.tensor_parallel_size} needs the whole model on the "
            f"GPUs (gpu_layers > {num_layers}, got {config.gpu_layers}) or device='cpu'"
        )
    if ":" in wanted:
        raise ValueError(f"with tensor parallelism rank r runs on cuda:r; got device={wanted!r}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < config.tensor_parallel_size:
        raise RuntimeError(
            f"tensor_parallel_size {config.tensor_parallel_size} needs as many GPUs; "
            f"{available} visible"
        )
    return torch.device(f"cuda:{rank}")


def shard_plan(gguf: GGUFFile, model_config: ModelConfig, rank: int,
               world_size: int) -> ShardPlan:  # fmt: skip
    if MODELS.get(model_config.architecture) is not DecoderForCausalLM:
        raise ValueError(
            f"tensor parallelism covers the shared decoder; {model_config.architecture!r} runs "
            f"on {MODELS.get(model_config.architecture)}"
        )
    plan = ShardPlan(model_config, rank, world_size, gguf.tensors)
    plan.check(gguf.tensors)
    return plan


@dataclasses.dataclass
class RankParts:
    """What one rank builds: its model, runner (KV cache), group."""

    model: TensorParallelDecoder
    plan: ShardPlan
    group: TensorParallelGroup
    kv_cache_dtype: torch.dtype


def build_rank(gguf: GGUFFile, model_config: ModelConfig, config: EngineConfig, rank: int,
               port: int, timeout_s: float, store=None, progress=None) -> RankParts:  # fmt: skip
    device = rank_device(config, rank, model_config.num_layers)
    plan = shard_plan(gguf, model_config, rank, config.tensor_parallel_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the kernels launch on the current device
        use_expandable_segments()  # before the first weight is allocated
        check_gpu_memory(gguf, plan, config, device)
    group = TensorParallelGroup(rank, config.tensor_parallel_size, port, device, timeout_s, store,
                                CONNECT_TIMEOUT_S)  # fmt: skip
    # repacking's temporaries come from a pool released after the build (as engine/loader.py)
    with staging_scope(device if device.type == "cuda" else None):
        model = TensorParallelDecoder(gguf, plan, group, device, config.ctx_size,
                                      config.flash_attn, progress)  # fmt: skip
    kv_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return RankParts(model, plan, group, kv_dtype)


def one_step_config(config: EngineConfig) -> EngineConfig:
    """The engine config every rank's runner gets: no CUDA graphs (a captured NCCL all-reduce is
    a measurement for the device, not done yet), no decode bursts."""
    return dataclasses.replace(config, extra={**config.extra, "cuda_graphs": False},
                               num_scheduler_steps=1)  # fmt: skip


def worker_main(rank: int, model_path: str, config: EngineConfig, port: int, timeout_s: float,
                reports) -> None:  # fmt: skip
    """A worker process (ranks 1..tp-1): load, report ready, meet the group, run steps; then
    exit at once (nothing left to flush: the interpreter's teardown only costs time)."""
    if not torch.cuda.is_available():  # ranks share the host's cores (a worker means tp > 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    try:
        gguf = GGUFFile(model_path)
        parts = build_rank(gguf, model_config_from_gguf(gguf), config, rank, port, timeout_s)
        runner = ModelRunner(parts.model, parts.plan.local_config, one_step_config(config),
                             kv_cache_dtype=parts.kv_cache_dtype)  # fmt: skip
        reports.put((rank, "ready", ""))
        parts.group.connect()
        worker_loop(parts.model, runner.kv_caches, parts.group)
        parts.group.close()
        gguf.close()
    except BaseException:
        reports.put((rank, "error", traceback.format_exc()))
        reports.close()
        reports.join_thread()  # the traceback reaches rank 0 before the process ends
        os._exit(1)
    os._exit(0)


class WorkerSet:
    """The worker processes of one tensor-parallel model, seen from rank 0."""

    def __init__(self, processes: list, reports, timeout_s: float):
        self.processes, self.reports, self.timeout_s = processes, reports, timeout_s

    def wait_ready(self) -> None:
        """Return once every worker reported ready; raise (stopping the rest) if one failed,
        exited or did not report within the timeout."""
        pending = {rank for rank in range(1, len(self.processes) + 1)}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            try:
                rank, status, detail = self.reports.get(timeout=0.2)
            except queue_module.Empty:
                dead = self.describe_dead()
                if dead:
                    raise RuntimeError(f"tensor-parallel start-up failed: {dead}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"tensor-parallel ranks {sorted(pending)} were not ready after "
                        f"{self.timeout_s:.0f} s"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to load:\n{detail}")
            pending.discard(rank)

    def describe_dead(self) -> str:
        """'rank 2 exited with code 1 (...)' for every worker that has exited, else ''."""
        dead = []
        for rank, p in enumerate(self.processes, start=1):
            if p.exitcode is not None:
                detail = self._report_of(rank)
                dead.append(f"rank {rank} exited with code {p.exitcode}{detail}")
        return "; ".join(dead)

    def _report_of(self, rank: int) -> str:
        """A dead worker's traceback, if it left one on the queue."""
        try:
            while True:
                r, status, detail = self.reports.get_nowait()
                if r == rank and status == "error":
                    return f":\n{detail}"
        except (queue_module.Empty, OSError, ValueError):
            return ""

    def join(self) -> None:
        """Wait for the workers to exit (a few seconds), then terminate any left."""
        deadline = time.monotonic() + 10.0
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.exitcode is None:
                p.terminate()
                p.join(5.0)
            if p.exitcode is None:
                p.kill()
                p.join(5.0)


def rank_weight_bytes(gguf: GGUFFile, plan: ShardPlan) -> int:
    """Bytes of the GGUF tensors rank `plan.rank` holds on its GPU: all its parts but the
    embedding, which stays memory-mapped on the host unless the head is tied to it."""
    on_host = set() if plan.config.tie_word_embeddings else {"token_embd.weight"}
    return sum(plan.nbytes(name, info) for name, info in gguf.tensors.items()
               if name not in on_host)  # fmt: skip


def check_gpu_memory(gguf: GGUFFile, plan: ShardPlan, config: EngineConfig,
                     device: torch.device) -> None:  # fmt: skip
    """This rank's share (its weights, its KV heads' cache, full-vocabulary logits) against its
    GPU's free memory, before it allocates anything (engine/memory_plan.py). Each rank checks
    its own GPU: asking about another would open a CUDA context there."""
    memory = plan_gpu_memory(plan.local_config, config, rank_weight_bytes(gguf, plan),
                             plan.config.num_layers, head_on_gpu=True)  # fmt: skip
    free, _total = torch.cuda.mem_get_info(device)
    check_fits(memory, free, config, f"{device} (tensor-parallel rank {plan.rank})")


def _worker_context(device: torch.device):
    """On the CPU, forkserver where the platform has it: one clean server process that imported
    torch and llcuda once forks each worker (never the caller, whose threads a fork would not
    carry), so a worker starts in milliseconds instead of re-importing torch (1.5 s a process).
    On GPUs spawn: a process forked after anything touched the CUDA driver cannot use it, and
    1.5 s is nothing beside loading a shard."""
    if device.type == "cuda" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def start_tensor_parallel(gguf: GGUFFile, model_config: ModelConfig, config: EngineConfig,
                          progress=None) -> TensorParallelRunner:  # fmt: skip
    """Spawn the workers, build rank 0 here, connect; returns rank 0's runner (its `shutdown()`
    stops the workers)."""
    timeout_s = float(config.extra.get("tp_timeout_s", DEFAULT_TIMEOUT_S))
    world = config.tensor_parallel_size
    # every rank's split, before anything starts
    plans = [shard_plan(gguf, model_config, rank, world) for rank in range(world)]
    device = rank_device(config, 0, model_config.num_layers)
    if device.type == "cuda":  # rank 0's GPU before any worker starts; each worker checks its own
        check_gpu_memory(gguf, plans[0], config, device)
    store = create_store(world, max(timeout_s, CONNECT_TIMEOUT_S))
    ctx = _worker_context(device)
    reports = ctx.Queue()
    processes = [
        ctx.Process(target=worker_main, name=f"llcuda-tp-rank{rank}", daemon=True,
                    args=(rank, gguf.path, config, store.port, timeout_s, reports))
        for rank in range(1, world)
    ]  # fmt: skip
    workers = WorkerSet(processes, reports, START_TIMEOUT_S)
    for p in processes:
        p.start()
    try:
        parts = build_rank(gguf, model_config, config, 0, store.port, timeout_s, store, progress)
        runner = TensorParallelRunner(parts.model, parts.plan.local_config,
                                      one_step_config(config), parts.group, workers,
                                      parts.kv_cache_dtype)  # fmt: skip
        workers.wait_ready()
        parts.group.connect()
    except BaseException:
        for p in processes:
            if p.exitcode is None:
                p.terminate()
        workers.join()
        raise
    return runner
