"""One generation request as the engine tracks it: tokens, progress counter, KV blocks, status.

There is no prefill phase and no decode phase: a request only knows how many of its tokens already
have KV entries (`num_computed_tokens`). The scheduler feeds `all_token_ids[num_computed_tokens:]`
in chunks; when a chunk reaches the end of the known tokens a new token is sampled and appended.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from llcuda.sampling_params import SamplingParams

# llama.cpp's LLAMA_DEFAULT_SEED (0xFFFFFFFF, i.e. -1 as int32) means "pick a random seed".
RANDOM_SEED = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # admitted: holds KV blocks, scheduled every step the budget allows
    PREEMPTED = "preempted"  # was running, blocks taken back; back in the waiting queue, recomputes
    FINISHED_STOPPED = "finished_stopped"  # EOG token or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or ctx_size reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the caller

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}

# finish_reason (OpenAI / llama-server vocabulary) -> terminal status
FINISH_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}


class BlockTable:
    """A request's KV blocks in one cache group: token i lives in blocks[i // block_size].

    num_hashed: leading blocks registered in the prefix cache. num_dropped: in a sliding-window
    group, leading blocks that no later query can see any more; they went back to the pool and
    their entries hold 0, a placeholder that attention never reads (it starts at the window).
    """

    __slots__ = ("blocks", "num_hashed", "num_dropped")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.num_hashed = 0
        self.num_dropped = 0

    def clear(self) -> None:
        self.blocks, self.num_hashed, self.num_dropped = [], 0, 0

    def __repr__(self) -> str:
        return f"BlockTable({self.blocks}, hashed={self.num_hashed}, dropped={self.num_dropped})"


class Request:
    """A prompt, the tokens generated so far, and the engine's bookkeeping for it.

    `generator` is this request's own RNG (None: use the device's global RNG). Seeded requests get
    one so that their samples depend only on their own logits, never on who shares the batch.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt must hold at least one token")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []
        # with sampling_params.logprobs set: one runner.logprobs.TokenLogprob per output token
        self.output_logprobs: list[Any] = []
        # prompt + output, appended in place so that runners and samplers read it without copies
        self._all_token_ids: list[int] = list(self.prompt_token_ids)

        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.num_computed_tokens = 0  # tokens whose KV entries are written (or scheduled to be)
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache on admission
        self.num_preemptions = 0
        # KV blocks per cache group: [0] the full-attention layers', [1] the sliding-window
        # layers' where the model has both (engine/kv_cache_manager.py); token i lives in
        # block i // block_size of each
        self.kv_tables = (BlockTable(), BlockTable())
        # prefix caching: chained hashes of the full blocks of all_token_ids (memoised; tokens only
        # grow, so they stay valid across preemption)
        self.block_hashes: list[bytes] = []

        if seed is None:
            seed = sampling_params.seed
        self.seed = None if seed is None or seed == RANDOM_SEED else seed
        self.generator: torch.Generator | None = None
        if self.seed is not None:
            self.generator = torch.Generator(device=device)
            # torch seeds are 64-bit unsigned; fold any Python int into that range
            self.generator.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)

        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

        # structured output: a llcuda.structured GrammarState, advanced by each accepted token
        self.grammar: Any = None

        # text state, owned by the engine layer (LLMEngine)
        self.detokenizer: Any = None  # IncrementalDetokenizer-like: push(id) -> str, flush() -> str
        self.pending_text = ""  # decoded but held back: might be the start of a stop string
        self.output_text = ""  # text emitted so far

    # --- KV blocks of the full-attention group (the only group of most models) -----------------

    @property
    def block_table(self) -> list[int]:
        """KV block ids of the first cache group; token i lives in block_table[i // bs]."""
        return self.kv_tables[0].blocks

    @block_table.setter
    def block_table(self, blocks: list[int]) -> None:
        self.kv_tables[0].blocks = blocks

    @property
    def num_hashed_blocks(self) -> int:
        """Leading blocks of block_table already registered in the prefix cache."""
        return self.kv_tables[0].num_hashed

    # --- tokens ---------------------------------------------------------------------------------

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output tokens. A live view: do not mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    def extend_output_tokens(self, token_ids: list[int]) -> None:
        """Append sampled tokens (one step's, or a decode burst's in order)."""
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
        if self.first_token_time is None and token_ids:
            self.first_token_time = time.monotonic()

    def truncate_output(self, count: int) -> None:
        """Drop the last `count` output tokens (sampled past a stop string in a decode burst)."""
        if count:
            del self.output_token_ids[-count:]
            del self._all_token_ids[-count:]
            del self.output_logprobs[len(self.output_token_ids):]

    # --- status ---------------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def set_finished(self, reason: str) -> None:
        if reason not in FINISH_STATUS:
            raise ValueError(
                f"finish reason must be one of {sorted(FINISH_STATUS)}, got {reason!r}"
            )
        self.status = FINISH_STATUS[reason]
        self.finish_reason = reason
        self.finished_time = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
