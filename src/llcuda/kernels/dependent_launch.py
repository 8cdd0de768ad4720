"""Programmatic dependent launch (PDL, sm_90+): a decode step's kernels overlap their neighbours.

A decode step of a small model is ~200 kernels of a few microseconds each, and between two of
them the GPU idles: the next grid is launched only when the previous one has completed, then its
blocks are scheduled and set up. Launched with `launch_pdl=True`, a kernel's grid may start while
the previous kernel still runs, once every block of that kernel has passed
`gdc_launch_dependents`; its blocks are then resident and waiting when the previous grid ends.
So that this stays correct, every kernel launched this way follows one rule:

    before `wait_for_previous`: no store, and no load of anything the previous kernel may write
    (index arithmetic, and loads of what was written before the kernel before it: weights, the
    step's metadata, older KV-cache entries);
    `wait_for_previous` waits until the previous grid has completed and its writes are visible,
    then lets the next grid launch.

Because each kernel waits for its predecessor before it lets its successor launch, at most two
grids are ever in flight, and a kernel that completes has seen every kernel before it complete:
reading the output of any earlier kernel is safe after the wait. A kernel launched the ordinary
way (torch's, cuBLAS's) waits for everything before it, as always; one that follows a PDL kernel
simply starts when it completes. The stream capture of a CUDA graph keeps these edges.

When this kernel starts, the kernel two back has completed (the previous one passed its wait), so
everything written before the previous kernel is visible. The decode GEMVs (quant_matmul PRELOAD)
load their weights before the wait, so that those DRAM round trips overlap the previous kernel
instead of following it.

H100, graph replays of one decode step (BENCHMARKS.md, sixth session): Gemma 3 1B 1.43 -> 1.29 ms,
270M 0.72 -> 0.62 ms. Prefetching each GEMV's weight slice into L2 before the wait (cp.async.bulk
.prefetch) was slower than not (1.41 / 0.69 ms), presumably because it competes for DRAM with
the kernel still running, whose loads are the critical path; loading whole-row weight tiles into
registers instead pays (quant_matmul._gemv_config_preloaded).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait for the previous grid to complete (its writes visible), then allow the next
    grid to launch. A no-op otherwise (and in Triton's interpreter, which cannot run PTX)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of sm_90 or later, not Triton's
    interpreter, and not switched off by LLCUDA_PDL=0 (to compare, or to rule it out)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("LLCUDA_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_args(device: torch.device) -> dict:
    """The keyword arguments of one launch of a kernel that takes a `PDL` constexpr: the
    constexpr and Triton's `launch_pdl` option, both pdl_enabled(device)."""
    pdl = pdl_enabled(device)
    return {"PDL": pdl, "launch_pdl": pdl}
