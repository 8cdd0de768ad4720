"""Token bitmasks: filled on the host by llguidance, applied to the logits on the device.

A bitmask row holds one bit per token (32 per int32 word, token t in word t // 32, bit t % 32),
1 where the grammar allows the token. Only the constrained rows of a batch get one; the others'
logits are left alone, so constrained and free requests share the batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from llguidance import LLExecutor

from llcuda.structured.grammar_state import GrammarState

_executor: LLExecutor | None = None
# llguidance's thread pool only pays where there are cores for it: on the 2-core shared build
# machine it is no faster than one row after another (Gemma 3's vocabulary, a 4-property schema:
# 16 rows 1.45 against 1.29 ms a step, 64 rows 6.3 against 5.0 ms); not yet measured on the
# 16-core GPU host, where 64 rows are what it is for.
PARALLEL_MIN_ROWS = 16
PARALLEL_MIN_CPUS = 8


class _HostBuffers:
    """Reused host buffers for the masks: a fresh 512 KiB torch.zeros (16 rows of Gemma's
    vocabulary) took 19 ms on the loaded build machine (its parallel fill waits for busy cores),
    ten times the masks' own 1.3 ms. Two buffers taken in turn: a step's non-blocking copy to the
    GPU is done long before the buffer comes round again (each step's tokens reach the host
    between two launches with constrained rows, so the stream has passed the copy)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._turn = 0

    def get(self, num_rows: int, num_words: int, pinned: bool) -> torch.Tensor:
        """[num_rows, num_words] int32, contents undefined (llguidance writes every word)."""
        pair = self._buffers.get((num_words, pinned))
        if pair is None or pair[0].shape[0] < num_rows:
            capacity = 1 << max(num_rows - 1, 0).bit_length()  # the next power of two
            pair = [torch.empty(capacity, num_words, dtype=torch.int32, pin_memory=pinned)
                    for _ in range(2)]  # fmt: skip
            self._buffers[num_words, pinned] = pair
        self._turn ^= 1
        return pair[self._turn][:num_rows]


_host_buffers = _HostBuffers()


@dataclass
class TokenBitmask:
    """The masks of a batch's constrained rows."""

    rows: torch.Tensor  # [num_constrained] int64: which logit rows
    words: torch.Tensor  # [num_constrained, ceil(vocab / 32)] int32


def fill_bitmask(
    states: Sequence[GrammarState | None], device: torch.device
) -> TokenBitmask | None:
    """The next-token masks of the rows whose state is not None (None if no row has one).

    Computed on the host (many rows on many cores: in parallel on llguidance's threads, the GIL
    released); called after the step's forward pass is queued, so on a GPU it overlaps the
    forward pass. Copied to `device` without blocking the host.
    """
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    num_words = (states[rows[0]].vocab_size + 31) // 32
    pinned = device.type == "cuda"
    words = _host_buffers.get(len(rows), num_words, pinned)  # [num_constrained, num_words]
    row_bytes = num_words * 4
    if len(rows) >= PARALLEL_MIN_ROWS and (os.cpu_count() or 1) >= PARALLEL_MIN_CPUS:
        global _executor
        if _executor is None:
            _executor = LLExecutor()
        matchers = [(states[r].matcher, k) for k, r in enumerate(rows)]
        _executor.unsafe_compute_mask_ptr(matchers, words.data_ptr(), row_bytes, len(rows))
    else:
        base = words.data_ptr()
        for k, r in enumerate(rows):
            states[r].matcher.unsafe_compute_mask_ptr(base + k * row_bytes, row_bytes)
    return TokenBitmask(
        rows=torch.tensor(rows, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=True),
        words=words.to(device, non_blocking=True),
    )


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> torch.Tensor:
    """`logits` [num_seqs, vocab] with every token a row's mask forbids set to -inf (a new
    tensor; the caller's logits are not written). Columns past the mask's words (a model head
    wider than the vocabulary) are forbidden too."""
    n, num_words = mask.words.shape
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    # [n, num_words, 32] -> [n, num_words * 32]: bit b of word w is token 32 * w + b
    allowed = ((mask.words.unsqueeze(-1) >> shifts) & 1).view(n, num_words * 32).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    rows = logits.index_select(0, mask.rows)  # [n, vocab]
    rows = rows.masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits.index_copy(0, mask.rows, rows)
