"""Load-time weight staging (layers/weight_staging) on CUDA: weights repacked through the scratch
pool equal those packed directly, none of them lives in the pool, and the pool is gone once the
scope closes."""

from __future__ import annotations

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.layers import weight_staging
from llcuda.layers.linear import FusedQuantLinear, QuantLinear
from llcuda.layers.quant_tensor import QuantTensor
from tests.kernels.test_quant_matmul import random_rows

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

K = 1024


def _weight(qtype: GGMLType, n: int, seed: int) -> QuantTensor:
    return QuantTensor(random_rows(qtype, n, K, torch.Generator().manual_seed(seed)), qtype, (n, K))


def _pool_ranges(pool_id) -> list[tuple[int, int]]:
    return [(seg["address"], seg["address"] + seg["total_size"])
            for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool_id)]  # fmt: skip


def _layers(weights, device):
    return [QuantLinear(w, device) for w in weights] + [FusedQuantLinear(weights[:2], device)]


def test_staged_weights_equal_direct_ones_and_leave_the_pool():
    device = torch.device("cuda")  # no index, as the loader passes it
    weights = [_weight(GGMLType.Q4_K, 768, s) for s in range(3)]
    weights += [_weight(GGMLType.Q6_K, 300, 7), _weight(GGMLType.F16, 64, 9)]
    direct = _layers(weights, device)
    with weight_staging.staging_scope(device):
        pool_id = weight_staging._pools[torch.cuda.current_device()].id
        staged = _layers(weights, device)
        ranges = _pool_ranges(pool_id)
        assert ranges, "the repacking did not allocate from the scratch pool"
        for layer in staged:
            for t in layer.weight.tensors():
                assert not any(lo <= t.data_ptr() < hi for lo, hi in ranges)
        with pytest.raises(RuntimeError, match="already open"):
            with weight_staging.staging_scope(device):
                pass
    assert not _pool_ranges(pool_id)
    x = torch.randn(5, K, device=device)
    for a, b in zip(direct, staged, strict=True):
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
