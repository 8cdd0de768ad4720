"""The process groups of one tensor-parallel model: its ranks, its collectives, its timeouts.

Two groups over one TCPStore, as vLLM keeps them: a gloo group on the CPU for the control
messages (each step's pickled inputs, shutdown), and the device group for the tensors of the
forward pass (NCCL, one GPU per rank; on the CPU the gloo group serves both). A worker waiting
for the next step thus waits on a CPU socket, with no NCCL watchdog to kill it when the server
idles, and a dead peer fails the step's first message at once. Built as ProcessGroupGloo /
ProcessGroupNCCL objects directly, not torch.distributed's process-wide default group: several
engines (a TP model next to a TP=1 one, replicas) can live in one process, and nothing here is
global state. Every collective waits at most `timeout`, but for a worker's wait for the next
step (see broadcast_object).
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

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
                 timeout_s: float, store: dist.TCPStore | None = None,
                 connect_timeout_s: float = 60.0):  # fmt: skip
        self.rank, self.world_size, self.port = rank, world_size, port
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout = datetime.timedelta(seconds=timeout_s)  # each collective
        # meeting the others: rank 0 may see a worker's "ready" a while after it was sent
        self.connect_timeout = datetime.timedelta(seconds=max(connect_timeout_s, timeout_s))
        self._store = store
        self._cpu_pg = None  # control messages
        self._pg = None  # the forward pass's tensors

    def connect(self) -> None:
        if self._store is None:
            self._store = dist.TCPStore(LOCALHOST, self.port, self.world_size, is_master=False,
                                        timeout=self.connect_timeout)  # fmt: skip
        options = dist.ProcessGroupGloo._Options()
        options._timeout = self.connect_timeout  # each collective passes its own timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOCALHOST)]
        control = dist.PrefixStore("control/", self._store)
        self._cpu_pg = dist.ProcessGroupGloo(control, self.rank, self.world_size, options)
        if self.backend == "gloo":
            self._pg = self._cpu_pg
            return
        torch.cuda.set_device(self.device)
        nccl_options = dist.ProcessGroupNCCL.Options()
        nccl_options._timeout = self.connect_timeout
        self._pg = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", self._store), self.rank,
                                         self.world_size, nccl_options)  # fmt: skip

    def close(self) -> None:
        groups = {id(g): g for g in (self._pg, self._cpu_pg) if g is not None}
        self._pg = self._cpu_pg = self._store = None
        for group in groups.values():
            shutdown = getattr(group, "shutdown", None)
            if shutdown is not None:
                shutdown()

    @property
    def pg(self):
        if self._pg is None:
            raise RuntimeError("the tensor-parallel group is not connected (connect() first)")
        return self._pg

    @property
    def cpu_pg(self):
        if self._cpu_pg is None:
            raise RuntimeError("the tensor-parallel group is not connected (connect() first)")
        return self._cpu_pg

    # --- collectives (every rank calls each, in the same order) ---------------------------------

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        options = c10d.AllreduceOptions()
        options.timeout = self.timeout
        self.pg.allreduce([t], options).wait(self.timeout)
        return t

    def all_gather_cols(self, t: torch.Tensor) -> torch.Tensor:
        """[n, k] on every rank -> [n, world_size * k], rank order. (The logits are gathered
        on every rank rather than on rank 0 alone: NCCL and gloo both have all-gather.)"""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        options = c10d.AllgatherOptions()
        options.timeout = self.timeout
        self.pg.allgather([parts], [t.contiguous()], options).wait(self.timeout)
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
        first_timeout = IDLE_TIMEOUT if idle else self.timeout
        self.cpu_pg.broadcast(size, 0, first_timeout).wait(first_timeout)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.cpu_pg.broadcast(payload, 0, self.timeout).wait(self.timeout)
        if self.rank == 0:
            return obj
        return pickle.loads(payload.numpy().tobytes())
