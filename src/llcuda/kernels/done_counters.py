"""Done-counters for kernels whose programs split one output between them (split-KV attention
pieces, argmax pieces): each program counts itself done with an atomic add, and the one that
finishes last combines the pieces and sets the counter back to zero.

One int32 buffer per device serves every such kernel: the calls on a device run one after another
on its stream, and each leaves its counters zero for the next.
"""

from __future__ import annotations

import torch

COUNTERS: dict[torch.device, torch.Tensor] = {}


def done_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zero counters on `device`. Made outside any CUDA graph capture (a buffer made
    during one would belong to the graph's pool): run the captured step once eagerly first, as
    the decode graphs' warm-up at their largest batch does."""
    counters = COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"done-counters for {n} tiles were not made before the CUDA graph capture; "
                "run the same step once eagerly first"
            )
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        COUNTERS[device] = counters
    return counters
