"""Log-probabilities of the sampled tokens and of their most likely alternatives.

Which distribution: the model's own, `log_softmax` of the raw logits the sampler is handed,
before the repeat penalty, top-k / top-p / min-p and temperature. That is what OpenAI reports
(`logprobs` / `top_logprobs`), vLLM's default (`logprobs_mode="raw_logprobs"`) and llama-server's
`n_probs` (its `completion_probabilities`: softmax of `llama_get_logits_ith`; only with
`post_sampling_probs` does it report the filtered chain's probabilities, which llcuda does not).
One distribution for every API because it is the one that means something on its own: it does
not move with the sampling knobs, so scores of the same text compare across requests, greedy and
sampled runs report the same numbers, and a token the filters dropped still gets its true
log-prob instead of -inf.

Device work, only for the rows that ask (none: nothing runs): one log_softmax over those rows,
one gather of the chosen tokens, one topk at the largest k among them. The results travel to the
host packed into one float64 tensor per step, [num_rows, 1 + 2 * k_max] = (chosen log-prob,
top-k log-probs, top-k token ids; ids are exact in float64), copied with the sampled tokens and
waited for by the same event: no host sync beyond the one every step already has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llcuda.runner.sampler import to_device
from llcuda.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log-prob and its `k` most likely alternatives (most likely first;
    the sampled token is among them wherever it ranks in the top k)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-prob), descending log-prob


@dataclass
class LogprobRows:
    """Which rows of a sampled batch asked for log-probs, and how many alternatives each."""

    rows: list[int]  # row indices into the batch, ascending
    ks: list[int]  # top alternatives per asking row (SamplingParams.logprobs)
    # rows as an index tensor per device, made once (a burst selects them at every step)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> LogprobRows | None:
        """None when no row asks: the common case costs nothing."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        return cls(rows, [params[i].logprobs for i in rows])

    @property
    def k_max(self) -> int:
        return max(self.ks)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """rows as int64 [num_rows] on `device`, copied without blocking the host."""
        index = self._index.get(device)
        if index is None:
            index = to_device(torch.tensor(self.rows, dtype=torch.int64), device)
            self._index[device] = index
        return index


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: LogprobRows
) -> torch.Tensor:
    """Pack the asking rows' log-probs on the device (no host sync).

    logits: [num_seqs, vocab] raw, as handed to the sampler; token_ids: [num_seqs] int64, what
    it sampled. Returns [len(rows.rows), 1 + 2 * k] float64, k = min(rows.k_max, vocab).
    """
    num_seqs, vocab = logits.shape
    if len(rows.rows) < num_seqs:
        index = rows.index_on(logits.device)
        logits, token_ids = logits.index_select(0, index), token_ids.index_select(0, index)
    logprobs = logits.float().log_softmax(dim=-1)  # [n, vocab]
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # [n, 1]
    k = min(rows.k_max, vocab)
    if k == 0:
        return chosen.double()
    values, ids = logprobs.topk(k, dim=-1)  # [n, k] each, descending
    return torch.cat([chosen.double(), values.double(), ids.double()], dim=1)


def unpack_logprobs(
    payload: list, token_ids: list, rows: LogprobRows, request_ids: Sequence[str]
) -> dict[str, list[TokenLogprob]]:
    """Host side of compute_logprobs, after the step's sync, for one step or a burst.

    payload: per step, the packed rows ([num_steps][num_rows][1 + 2k], lists); token_ids: per
    step, the sampled ids of the whole batch ([num_steps][num_seqs]); request_ids: the batch's,
    by row. Returns {request_id: one TokenLogprob per step} for the asking rows.
    """
    out: dict[str, list[TokenLogprob]] = {request_ids[r]: [] for r in rows.rows}
    for step_payload, step_tokens in zip(payload, token_ids, strict=True):
        for packed, row, k in zip(step_payload, rows.rows, rows.ks, strict=True):
            width = (len(packed) - 1) // 2  # the step's k, cut to the vocabulary if it is less
            top = tuple((int(packed[1 + width + j]), packed[1 + j]) for j in range(min(k, width)))
            out[request_ids[row]].append(TokenLogprob(int(step_tokens[row]), packed[0], top))
    return out
