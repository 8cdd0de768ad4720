"""What the first CUDA graph of a process costs in device memory, outside torch's allocator.

    python benchmarks/cuda_graph_memory.py {eager|torch|driver|driver-autofree} [NODES]

Run each variant in a fresh process: the cost appears once per process. `torch` captures NODES
in-place adds with torch.cuda.graph (then a second graph); `driver` captures the same through the
driver API (cuStreamBeginCapture / cuStreamEndCapture, relaxed mode) and instantiates with flags 0
(`driver-autofree`: CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH); `eager` only runs them.
Prints the device memory in use (cudaMemGetInfo) after each phase, relative to the start.
"""

from __future__ import annotations

import ctypes
import sys

import torch

MIB = 2**20


def used_mib() -> float:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / MIB


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUresult {rc}")


def main() -> None:
    variant = sys.argv[1]
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    x = torch.zeros(4096, device="cuda")
    x.add_(1)  # the add kernel is loaded before the baseline
    start = used_mib()
    phases: list[str] = []

    def mark(name: str) -> None:
        phases.append(f"{name} +{used_mib() - start:.1f}")

    def work() -> None:
        for _ in range(nodes):
            x.add_(1)

    if variant == "eager":
        work()
        mark("eager")
    elif variant == "torch":
        for name in ("first graph", "second graph"):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                work()
            graph.replay()
            mark(name)
    elif variant in ("driver", "driver-autofree"):
        cu = ctypes.CDLL("libcuda.so.1")
        stream = torch.cuda.Stream()
        handle = ctypes.c_void_p(stream.cuda_stream)
        graph, graph_exec = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.stream(stream):
            check(cu.cuStreamBeginCapture_v2(handle, 2), "cuStreamBeginCapture")
            work()
            check(cu.cuStreamEndCapture(handle, ctypes.byref(graph)), "cuStreamEndCapture")
        mark("captured")
        flags = ctypes.c_ulonglong(1 if variant == "driver-autofree" else 0)
        check(cu.cuGraphInstantiateWithFlags(ctypes.byref(graph_exec), graph, flags),
              "cuGraphInstantiateWithFlags")  # fmt: skip
        mark("instantiated")
        check(cu.cuGraphLaunch(graph_exec, handle), "cuGraphLaunch")
        stream.synchronize()
        mark("launched")
    else:
        raise SystemExit(f"unknown variant {variant!r}: eager, torch, driver or driver-autofree")
    print(f"{variant} ({nodes} nodes), start {start:.0f} MiB: " + " | ".join(phases))


if __name__ == "__main__":
    main()
