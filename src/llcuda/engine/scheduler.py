"""Continuous batching with a token budget: which requests feed how many tokens this step.

No prefill phase, no decode phase (vLLM v1's design): a request feeds
`all_token_ids[num_computed_tokens:]`, at most `ubatch_size` tokens a step, until it reaches the
end of its known tokens; that step samples a new token. A prompt therefore takes several steps
(chunked prefill) and shares each step with other requests' single decode tokens.

Policy per step (budget = `batch_size` tokens over all requests):
1. Running requests, oldest admission first, each gets min(ubatch_size, tokens left, budget left)
   tokens (a decoding request has exactly one token left). If the KV cache has no block for one,
   the newest running request not yet scheduled this step is preempted (blocks freed, progress
   reset to 0 -- recompute -- and put at the front of the waiting queue); if none is left, the
   request itself is. The oldest request therefore always progresses: no livelock.
2. If nothing was preempted, waiting requests are admitted first come first served while fewer
   than `n_parallel` run, budget is left and the cache has blocks for their first chunk. The head of
   the queue blocks the rest (FCFS), so a large prompt is not starved by small ones. With prefix
   caching an admitted request starts with `num_computed_tokens` = the tokens its cached blocks hold
   (whole blocks, never its last token); a preempted request readmitted looks its prompt and output
   tokens up again, so recomputation after preemption reuses whatever is still cached.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llcuda.config import EngineConfig
from llcuda.engine.block_manager import BlockManager, cdiv
from llcuda.engine.kv_cache_manager import KVCacheManager
from llcuda.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    # tokens fed this step: request.all_token_ids[start_pos : start_pos + num_tokens], at
    # positions start_pos .. start_pos + num_tokens - 1 (their KV entries are written this step)
    num_tokens: int
    # request.num_computed_tokens before the step: the KV entries [0, start_pos) already exist
    start_pos: int
    # True when the fed tokens reach the end of the known tokens: the logits of the last fed
    # position must be sampled and the new token returned for this request
    sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def seq_len(self) -> int:
        """KV length after this step (the attention span of the last fed token)."""
        return self.start_pos + self.num_tokens


@dataclass
class SchedulerOutput:
    """The step contract handed to the model runner.

    The runner flattens `scheduled` in order: input_ids / positions / slot_mapping have
    `total_num_tokens` rows, request r's rows are [query_start_loc[r], query_start_loc[r + 1]),
    slot = block_table[pos // block_size] * block_size + pos % block_size, seq_lens[r] =
    start_pos + num_tokens. It returns {request_id: sampled token id} for entries with sample=True.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)  # batch order
    total_num_tokens: int = 0  # sum of num_tokens over `scheduled` (<= batch_size)
    # requests preempted this step: their KV blocks were freed (the runner may drop state for them)
    preempted_ids: list[str] = field(default_factory=list)
    # requests that finished or were aborted since the previous schedule() (drop their state)
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting queue and the running set; hands out the per-step token budget."""

    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager | KVCacheManager,
        eog_ids: Iterable[int] = (),
    ) -> None:
        blocks_per_seq = cdiv(config.ctx_size, block_manager.block_size)
        if blocks_per_seq > block_manager.num_blocks:
            # a lone request must always fit, or preemption could loop forever
            raise ValueError(
                f"KV cache has {block_manager.num_blocks} blocks of {block_manager.block_size} "
                f"tokens but one full context (ctx_size={config.ctx_size}) needs {blocks_per_seq}"
            )
        self.config = config
        self.block_manager = block_manager
        self.eog_ids = frozenset(eog_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: preemption takes from the end
        self.requests: dict[str, Request] = {}  # live (unfinished) requests by id
        self._finished_ids: list[str] = []  # finished since the last schedule()

    # --- queue management -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        ctx = self.config.ctx_size
        if request.num_tokens > ctx - 1:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens but ctx_size is {ctx} "
                f"(at least one token must be left to generate)"
            )
        if request.sampling_params.max_tokens < 1:
            raise ValueError(
                f"request {request.request_id!r}: max_tokens must be >= 1 to be scheduled "
                "(the engine finishes max_tokens=0 requests without running them)"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.block_table:
            raise ValueError(f"request {request.request_id!r} is not new: {request!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, reason: str) -> bool:
        """End a live request now ("stop", "length" or "abort") and free its blocks.

        Returns False if no live request has that id (unknown or already finished).
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.set_finished(reason)
        self._finished_ids.append(request_id)
        return True

    def abort_request(self, request_id: str) -> bool:
        return self.finish_request(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.batch_size

        # 1. running requests, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            while not bm.allocate_slots(request, num_new):
                # newest not yet scheduled this step; the request itself when it is the newest
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(
                    ScheduledRequest(
                        request=request,
                        num_tokens=num_new,
                        start_pos=request.num_computed_tokens,
                        sample=request.num_computed_tokens + num_new == request.num_tokens,
                    )
                )
                budget -= num_new
                i += 1

        # 2. admit waiting requests, first come first served
        while (
            not out.preempted_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.n_parallel
        ):
            request = self.waiting[0]
            cached = bm.find_cached_blocks(request)
            num_computed = len(cached) * bm.block_size
            num_new = min(request.num_tokens - num_computed, budget, self.config.ubatch_size)
            if not bm.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            if bm.enable_prefix_caching:
                bm.prefix_cache_stats.record(request.num_tokens, num_computed)
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                # the first admission's hits: prompt tokens only (a readmitted request's hits
                # may cover its output tokens too)
                request.num_cached_tokens = num_computed
            self.running.append(request)
            out.scheduled.append(
                ScheduledRequest(
                    request=request,
                    num_tokens=num_new,
                    start_pos=num_computed,
                    sample=num_computed + num_new == request.num_tokens,
                )
            )
            budget -= num_new

        out.total_num_tokens = self.config.batch_size - budget
        return out

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, int | list[int]]
    ) -> list[Request]:
        """Advance progress after the model ran `output`; append sampled tokens.

        A request's entry is one token, or a decode burst's list of them (each computed from the
        one before): they are taken in order until one ends the request, and the rest dropped.
        Returns the requests that finished this step: EOG token ("stop", unless ignore_eos),
        max_tokens or ctx_size reached ("length"). Their blocks are already freed. Requests
        finished or aborted between schedule() and now are skipped.
        """
        finished: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            if request.num_computed_tokens != item.start_pos:
                raise RuntimeError(f"{request!r} changed while its step ran ({item})")
            request.num_computed_tokens += item.num_tokens
            if not item.sample:
                self.block_manager.cache_full_blocks(request)
                continue
            try:
                tokens = sampled[request.request_id]
            except KeyError:
                raise KeyError(
                    f"model runner returned no sampled token for request {request.request_id!r}"
                ) from None
            tokens = [int(t) for t in tokens] if isinstance(tokens, list) else [int(tokens)]
            if not tokens:
                raise ValueError(f"model runner returned an empty burst for {request!r}")
            kept, reason = self._tokens_kept(request, tokens)
            # a burst's later tokens: the KV entry of each one before them was written
            request.num_computed_tokens += kept - 1
            request.extend_output_tokens(tokens[:kept])
            self.block_manager.cache_full_blocks(request)
            if reason is not None:
                self.finish_request(request.request_id, reason)
                finished.append(request)
        return finished

    # --- helpers --------------------------------------------------------------------------------

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        left = request.num_tokens - request.num_computed_tokens
        assert left >= 1, f"running request with nothing to compute: {request!r}"
        return min(left, budget, self.config.ubatch_size)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0  # recompute prompt + output tokens when readmitted
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _tokens_kept(self, request: Request, tokens: list[int]) -> tuple[int, str | None]:
        """How many of `tokens` (sampled in order) the request keeps, and why it then ends: the
        first EOG token ("stop", unless ignore_eos), max_tokens or ctx_size reached ("length";
        on the same token as an EOG, "stop" wins), or None when it goes on. One pass over a
        burst's tokens instead of a check after each."""
        params = request.sampling_params
        kept, reason = len(tokens), None
        if not params.ignore_eos and self.eog_ids:
            for i, token_id in enumerate(tokens):
                if token_id in self.eog_ids:
                    kept, reason = i + 1, "stop"
                    break
        # tokens until max_tokens / ctx_size: >= 1 for a running request (else it had ended)
        limit = max(1, min(params.max_tokens - request.num_output_tokens,
                           self.config.ctx_size - request.num_tokens))  # fmt: skip
        if limit < kept or (limit == kept and reason is None):
            kept, reason = limit, "length"
        return kept, reason
