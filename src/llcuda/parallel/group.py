"""The process group of one tensor-parallel model: its ranks, its collectives, its timeouts.

Built from a TCPStore and a ProcessGroupGloo (CPU) or ProcessGroupNCCL (one GPU per rank)
object directly, not torch.distributed's process-wide default group: several engines (a TP
model next to a TP=1 one, replicas) can live in one process, and nothing here is global state.
Every collective waits at most `timeout` (a peer that died or hangs is an error, never a hang).
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

LOCALHOST = "127.0.0.1"
# how long a worker waits for rank 0's next step: as long as rank 0 lives (see broadcast_object)
IDLE_TIMEOUT = datetime.timedelta(days=365)


def create_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free local port (`store.port` is what the workers connect to)."""
    return dist.TCPStore(LOCALHOST, 0, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


class TensorParallelGroup:
    """Rank `rank` of `world_size` ranks. `device` is where its collectives' tensors live
    (cpu: gloo; cuda:N: NCCL). Created unconnected so that a rank can load its weights first;
    `connect()` meets the other ranks (every rank must call it)."""

    def __init__(self, rank: int, world_size: int, port: int, device: torch.device,
                 timeout_s: float, store: dist.TCPStore | None = None):  # fmt: skip
        self.rank, self.world_size, self.port = rank, world_size, port
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = store
        self._pg = None

    def connect(self) -> None:
        if self._store is None:
            self._store = dist.TCPStore(LOCALHOST, self.port, self.world_size, is_master=False,
                                        timeout=self.timeout)  # fmt: skip
        if self.backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOCALHOST)]
            self._pg = dist.ProcessGroupGloo(self._store, self.rank, self.world_size, options)
        else:
            torch.cuda.set_device(self.device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(self._store, self.rank, self.world_size, options)

    def close(self) -> None:
        pg, self._pg, self._store = self._pg, None, None
        shutdown = getattr(pg, "shutdown", None)
        if shutdown is not None:
            shutdown()

    @property
    def pg(self):
        if self._pg is None:
            raise RuntimeError("the tensor-parallel group is not connected (connect() first)")
        return self._pg

    # --- collectives (every rank calls each, in the same order) ---------------------------------

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        self.pg.allreduce([t]).wait(self.timeout)
        return t

    def all_gather_cols(self, t: torch.Tensor) -> torch.Tensor:
        """[n, k] on every rank -> [n, world_size * k], rank order. (The logits are gathered
        on every rank rather than on rank 0 alone: NCCL and gloo both have all-gather.)"""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.pg.allgather([parts], [t.contiguous()]).wait(self.timeout)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: object = None, idle: bool = False) -> object:
        """Rank 0's `obj` (pickled: tensors, ints, dataclasses of them) on every rank.

        idle=True (a worker waiting for the next step): no timeout on its arrival, as a server
        may go hours without a request; a rank 0 that exits or dies closes the connection,
        which ends the wait with an error (everything after the first message times out)."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = size.to(self.device)
        first_timeout = IDLE_TIMEOUT if idle else self.timeout
        self.pg.broadcast(size, 0, first_timeout).wait(first_timeout)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        payload = payload.to(self.device)
        self.pg.broadcast(payload, 0).wait(self.timeout)
        if self.rank == 0:
            return obj
        return pickle.loads(payload.cpu().numpy().tobytes())
