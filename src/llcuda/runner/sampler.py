"""Token sampling with llama.cpp's semantics, batched, seeded per request, without host syncs.

Order (llama.cpp `common/sampling.cpp` default chain, minus the samplers that are off by default:
DRY, top-n-sigma, typical-p, XTC):

    repeat penalty -> top_k -> top_p -> min_p -> temperature -> sample

Temperature comes last, so top_p and min_p see the temperature-1 distribution, as in llama.cpp.
Greedy rows (temperature 0 or top_k 1) take the argmax of the penalised logits; the filters
always keep the maximum, so that equals llama.cpp's chain, ties going to the lowest token id.

Random rows sample with the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with
probability p_i, needs no cumulative sum, no multinomial and no host sync. A seeded row draws its
noise from its own generator, one value per vocabulary entry in token-id order, so its sample
depends only on its own logits and generator state, never on which other rows share the batch.
Unseeded rows share one draw from the device's default generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llcuda.kernels import ops
from llcuda.sampling_params import SamplingParams
from llcuda.structured.bitmask import TokenBitmask, apply_token_bitmask


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[Sequence[int]],
    token_bitmask: TokenBitmask | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits: [num_seqs, vocab] float32 (any device; not modified).
    params / generators / history: one per row; history is the row's tokens so far (prompt and
    output), read for the repeat penalty.
    token_bitmask: the allowed tokens of the constrained rows (structured output), applied first:
    every later filter and the sample see only allowed tokens.
    Returns [num_seqs] int64 on logits.device. The caller's `.tolist()` is the only host sync.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_seqs, vocab], got shape {tuple(logits.shape)}")
    num_seqs = logits.shape[0]
    if not (len(params) == len(generators) == len(history) == num_seqs):
        raise ValueError(
            f"sample: {num_seqs} logit rows but {len(params)} params, {len(generators)} "
            f"generators and {len(history)} histories"
        )
    if num_seqs == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    logits = apply_repeat_penalty(logits.float(), params, history)  # [num_seqs, vocab]
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == num_seqs:
        return _sample_random(logits, params, generators)
    # ties: the first maximal index, i.e. the lowest token id (as torch.argmax)
    tokens = ops.argmax(logits)  # [num_seqs]
    if not rows:
        return tokens
    index = _device_tensor(rows, torch.int64, logits.device)  # [num_random]
    random_tokens = _sample_random(
        logits.index_select(0, index), [params[i] for i in rows], [generators[i] for i in rows]
    )
    return tokens.index_copy(0, index, random_tokens)


def apply_repeat_penalty(
    logits: torch.Tensor, params: Sequence[SamplingParams], history: Sequence[Sequence[int]]
) -> torch.Tensor:
    """llama.cpp's repeat penalty over each row's last `repeat_last_n` tokens (-1: all of them).

    Every distinct token in the window has its logit divided by the penalty if positive and
    multiplied by it otherwise (once, however often it occurs). Returns a new tensor when any
    row is penalised, else `logits` itself.
    """
    rows: list[int] = []
    windows: list[Sequence[int]] = []
    for i, p in enumerate(params):
        n = p.repeat_last_n
        if p.repeat_penalty == 1.0 or n == 0 or not history[i]:
            continue
        rows.append(i)
        windows.append(history[i] if n < 0 else history[i][-n:])
    if not rows:
        return logits
    width = max(len(w) for w in windows)
    vocab = logits.shape[1]
    # flat indices into logits: row * vocab + token. Each window is padded with its own first
    # token: a repeated index writes the same value twice, harmlessly.
    flat = [[i * vocab + t for t in w] + [i * vocab + w[0]] * (width - len(w))
            for i, w in zip(rows, windows, strict=True)]  # fmt: skip
    device = logits.device
    flat_t = _device_tensor(flat, torch.int64, device)  # [num_penalised, width]
    penalty = _device_tensor([params[i].repeat_penalty for i in rows], torch.float32, device)
    seen = logits.take(flat_t)  # [num_penalised, width]
    seen = torch.where(seen <= 0, seen * penalty[:, None], seen / penalty[:, None])
    out = logits.clone()  # never write into the caller's logits
    out.view(-1).scatter_(0, flat_t.view(-1), seen.view(-1))
    return out


def _sample_random(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """top_k -> top_p -> min_p -> temperature -> exponential race. logits: [n, vocab]."""
    n, vocab = logits.shape
    device = logits.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    k_max = max(ks)
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    # every per-row knob in one host -> device copy: [n, 4] = (top_k, top_p, log min_p, temp)
    knobs = _device_tensor(
        [[k, p.top_p, math.log(p.min_p) if p.min_p > 0 else -math.inf, p.temperature]
         for k, p in zip(ks, params, strict=True)],
        torch.float32, device,
    )  # fmt: skip
    indices: torch.Tensor | None = None  # candidate -> token id; None: candidates = vocabulary
    if k_max < vocab or min(top_p) < 1.0:
        # candidates in descending logit order; past a row's own top_k they are masked below
        values, indices = logits.topk(k_max, dim=-1)  # [n, k_max] each
    else:
        values = logits  # no top_k, no top_p: min_p and temperature need no order
    pos = torch.arange(k_max, device=device, dtype=torch.float32)  # [k_max]

    if min(ks) < k_max:
        values = values.masked_fill(pos >= knobs[:, 0:1], -math.inf)

    if min(top_p) < 1.0:
        # keep the smallest prefix whose probability reaches p: entry j stays when the mass
        # before it is still < p (the first entry always stays, as in llama.cpp)
        probs = values.softmax(dim=-1)  # [n, k_max]
        mass_before = probs.cumsum(dim=-1) - probs
        p_t = knobs[:, 1:2]  # [n, 1]
        keep = (mass_before < p_t) | (pos == 0) | (p_t >= 1.0)
        values = values.masked_fill(~keep, -math.inf)

    if max(min_p) > 0.0:
        # keep tokens with p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p)
        best = values[:, :1] if indices is not None else values.amax(dim=-1, keepdim=True)
        values = values.masked_fill(values < best + knobs[:, 2:3], -math.inf)  # [n, k_max]

    probs = (values / knobs[:, 3:4]).softmax(dim=-1)  # [n, k_max]

    noise = _exponential_noise(n, vocab, k_max, indices, generators, device)  # [n, k_max]
    choice = (probs / noise).argmax(dim=-1, keepdim=True)  # [n, 1]
    if indices is None:
        return choice.squeeze(1)
    return indices.gather(1, choice).squeeze(1)


def _exponential_noise(
    n: int,
    vocab: int,
    k_max: int,
    indices: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:
    """Exp(1) noise for the candidates `indices` [n, k_max] (None: the vocabulary)."""
    noise = torch.empty(n, k_max, device=device).exponential_()  # default generator
    for row, gen in enumerate(generators):
        if gen is None:
            continue
        # one value per vocabulary entry in token-id order: independent of k_max and of ties
        if gen.device.type == device.type:
            row_noise = torch.empty(vocab, device=device).exponential_(generator=gen)
        else:  # generator made for another device: correct, but pays a copy
            row_noise = torch.empty(vocab, device=gen.device).exponential_(generator=gen)
            row_noise = to_device(row_noise, device)
        noise[row] = row_noise if indices is None else row_noise.index_select(0, indices[row])
    # Exp(1) can return 0; p / 0 would be inf, or NaN for a masked token
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def _device_tensor(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`, copied without blocking the host."""
    return to_device(torch.tensor(data, dtype=dtype), device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor bound for a GPU goes through pinned memory, so the copy is
    queued on the stream instead of synchronising the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # a pageable host -> device copy synchronises; a pinned one is queued on the stream
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
