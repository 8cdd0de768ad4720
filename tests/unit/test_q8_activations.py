"""The int8 activation layout the norms write and the decode GEMV reads (kernels/q8_activations)."""

from __future__ import annotations

import pytest
import torch

from llcuda.kernels import ops
from llcuda.kernels.q8_activations import pack_q8_ref, quantize_q8_ref


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """Q8Rows words [M, K/4] -> q [M, K/32, 32] as fp32 (byte b of word j of a group: 8b + j)."""
    w = words.view(words.shape[0], -1, 8).to(torch.int64)  # [M, G, word j]
    b = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=2)  # [M, G, byte b, word j]
    return torch.where(b >= 128, b - 256, b).reshape(words.shape[0], -1, 32).float()


def test_pack_q8_ref_holds_quantize_q8_refs_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=gen) * torch.logspace(-3, 3, 256)
    x[1, 32:64] = 0.0  # a zero group: dx 0, q 0
    x[2, 0] = 1e30  # one huge value: the rest of its group rounds to 0
    rows = pack_q8_ref(x)
    assert rows.words.dtype == torch.int32 and rows.words.shape == (3, 64)
    assert rows.meta.dtype == torch.float32 and rows.meta.shape == (3, 8, 4)
    q = _unpack(rows.words)
    assert q.abs().max() <= 127
    dx, sq_lo, sq, zero = rows.meta.unbind(-1)
    torch.testing.assert_close((q * dx[..., None]).reshape(3, 256), quantize_q8_ref(x),
                               rtol=0, atol=0)  # fmt: skip
    assert torch.equal(sq_lo, q[..., :16].sum(-1)) and torch.equal(sq, q.sum(-1))
    assert torch.equal(zero, torch.zeros_like(zero))
    assert torch.equal(dx[1, 1], torch.tensor(0.0)) and torch.equal(q[1, 1], torch.zeros(32))
    assert q[2, 0, 0] == 127 and q[2, 0, 1:].abs().max() == 0


def test_q8_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_q8_ref(torch.zeros(1, 40))


def test_cpu_norms_have_no_q8_rows():
    """The CPU path has no int8 GEMV: asked for them, the norms give None beside their outputs."""
    x, a, w = torch.randn(2, 64), torch.randn(2, 64), torch.rand(64)
    x_out, h, q = ops.residual_rms_norm(x, a, None, w, 1e-6, q8=True)
    assert q is None
    assert ops.residual_rms_norm(x, a, None, w, 1e-6)[2] is None
    torch.testing.assert_close((x_out, h), ops.residual_rms_norm(x, a, None, w, 1e-6)[:2])
    h2, q2 = ops.rms_norm_q8(x, w, 1e-6)
    assert q2 is None and torch.equal(h2, ops.rms_norm(x, w, 1e-6))


def test_tie_slack_names_the_elements_at_rounding_ties():
    from llcuda.kernels.q8_activations import Q8_TIE_WINDOW, q8_tie_slack

    # group 0: max 127 so dx = 1 and x / dx = x; 2.5 and -3.5 are ties, 2.4 and 7 are not;
    # group 1: all zeros (dx 0, nothing open)
    x = torch.zeros(1, 64)
    x[0, :5] = torch.tensor([127.0, 2.5, -3.5, 2.4, 7.0])
    x[0, 5] = 10.5 + Q8_TIE_WINDOW / 2  # within the window
    slack = q8_tie_slack(x)
    assert slack.shape == x.shape
    assert torch.nonzero(slack[0]).flatten().tolist() == [1, 2, 5]
    torch.testing.assert_close(slack[0, [1, 2, 5]], torch.ones(3))
    # ties are rare in random data: ~2 * Q8_TIE_WINDOW of the elements
    r = q8_tie_slack(torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)))
    assert 0 < (r > 0).float().mean().item() < 6 * Q8_TIE_WINDOW
