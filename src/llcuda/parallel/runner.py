"""Rank 0's model runner and the workers' loop: the same forward pass on every rank, one step at a
time.

The scheduler lives in rank 0's process only. For each step rank 0 builds the flat batch
(ModelRunner.prepare_inputs) and broadcasts it as a StepInput: plain tensors and ints, no request
objects, so it pickles. Every rank then runs embed -> forward -> compute_logits on it; the
collectives inside pair up because every rank makes the same calls in the same order. Sampling
runs on rank 0 alone (the workers' logits are dropped): the sampling parameters, seeded
generators and token histories stay with the requests, in rank 0's process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.scheduler import SchedulerOutput
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.parallel.group import TensorParallelGroup
from llcuda.parallel.model import TensorParallelDecoder
from llcuda.runner.model_runner import ModelRunner, SampledTokens


@dataclass
class StepInput:
    """One step's flat batch, as every rank needs it (ModelRunner.prepare_inputs's output)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata  # slot mappings, block tables, lengths
    logits_indices: torch.Tensor  # [num_sampled] int64: rows of the batch that sample


@torch.inference_mode()
def run_step(model: TensorParallelDecoder, kv_caches: list[KVCache],
             step: StepInput) -> torch.Tensor | None:  # fmt: skip
    """Logits [num_sampled, vocab_size] of the step (None when no row samples: a prompt chunk)."""
    device = model.head_device
    x = model.embed(step.input_ids)  # [num_tokens, hidden_size]
    hidden = model.forward(x, step.positions, {device: step.meta.to(device)}, kv_caches)
    if step.logits_indices.numel() == 0:
        return None
    return model.compute_logits(hidden[step.logits_indices.to(hidden.device)])


def worker_loop(model: TensorParallelDecoder, kv_caches: list[KVCache],
                group: TensorParallelGroup) -> None:  # fmt: skip
    """A worker rank: run each step rank 0 broadcasts, until it broadcasts None (shutdown)."""
    while True:
        step = group.broadcast_object(idle=True)
        if step is None:
            return
        run_step(model, kv_caches, step)


class TensorParallelRunner(ModelRunner):
    """ModelRunner on rank 0 of a tensor-parallel group: ships each step to the workers, runs its
    own part, samples. One step per launch (no decode bursts, no CUDA graphs)."""

    def __init__(self, model: TensorParallelDecoder, local_config: ModelConfig,
                 engine_config: EngineConfig, group: TensorParallelGroup, workers,
                 kv_cache_dtype: torch.dtype = torch.float32):  # fmt: skip
        # local_config: this rank's heads, so the KV cache holds this rank's KV heads only
        super().__init__(model, local_config, engine_config, kv_cache_dtype)
        self.group, self.workers = group, workers
        self.closed = False

    @property
    def default_decode_steps(self) -> int:
        return 1

    @property
    def supports_decode_bursts(self) -> bool:
        return False

    @property
    def supports_chained_bursts(self) -> bool:
        return False

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, num_steps: int = 1,
               after: SampledTokens | None = None) -> SampledTokens:  # fmt: skip
        if num_steps != 1 or after is not None:
            raise ValueError("a tensor-parallel runner runs one step per launch (no bursts)")
        if self.closed:
            raise RuntimeError("the tensor-parallel workers were shut down")
        if not step.scheduled:
            return SampledTokens([], None)
        input_ids, positions, meta, logits_indices = self.prepare_inputs(step)
        step_input = StepInput(input_ids, positions, meta, logits_indices)
        with self._workers_checked():
            self.group.broadcast_object(step_input)
            logits = run_step(self.model, self.kv_caches, step_input)
        if logits is None:
            return SampledTokens([], None)
        return self.sample_requests(logits, [item.request for item in step.scheduled
                                             if item.sample])  # fmt: skip

    @contextlib.contextmanager
    def _workers_checked(self) -> Iterator[None]:
        """A failed collective becomes an error that says which worker died, if one did."""
        try:
            yield
        except RuntimeError as e:
            # after a failed collective the ranks are out of step: no further step can run
            self.closed = True
            dead = self.workers.describe_dead() or (
                f"no worker exited; a rank stalled past the {self.group.timeout} timeout or "
                f"its connection broke"
            )
            raise RuntimeError(f"tensor-parallel step failed: {dead} ({e})") from e

    def shutdown(self) -> None:
        """Tell the workers to exit, wait for them (terminating any that do not), drop the
        group. Idempotent."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(RuntimeError):  # a worker already gone
                self.group.broadcast_object(None)
        self.workers.join()
        self.group.close()
