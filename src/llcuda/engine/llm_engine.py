"""The synchronous engine: add requests, `step()` the batch, get per-request deltas back.

One step = schedule (token budget) -> model runner (flat batch, sample) -> scheduler update
(append tokens, EOG / max_tokens / ctx_size) -> text (incremental detokenizer, stop strings).
When every scheduled sequence is decoding, a step may be a decode burst: the runner chains up to
`decode_steps` steps on the device and each sequence gets that many tokens at once, taken in order
until one of them ends it. Nothing here is thread-safe; `EngineLoop` runs it on a background
thread.

Stop strings: text that matches a stop string is never emitted. Text that could still be the start
of a stop string is held back until the next tokens decide (llama-server's partial-stop rule), so a
stream never shows a stop string, or part of one that later completes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llcuda.config import EngineConfig
from llcuda.engine.kv_cache_manager import KVCacheGroup, KVCacheManager
from llcuda.engine.request import Request, RequestStatus
from llcuda.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from llcuda.sampling_params import SamplingParams

_log = logging.getLogger("llcuda.engine")


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta), or with `finished` its last delta."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (an EOG token that ended it included)
    new_text: str  # newly released text: whole UTF-8 characters, never part of a stop string
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished, else None
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far, this step's tokens included
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on admission
    arrival_time: float = 0.0  # time.monotonic() of add_request
    first_token_time: float | None = None  # time.monotonic() of the first sampled token
    finished_time: float | None = None
    # with sampling_params.logprobs set: one runner.logprobs.TokenLogprob per new token
    new_logprobs: list[Any] | None = None

    def merge(self, delta: RequestOutput) -> RequestOutput:
        """This output followed by a later `delta` of the same request (aggregation)."""
        if delta.request_id != self.request_id:
            raise ValueError(f"cannot merge {delta.request_id!r} into {self.request_id!r}")
        # the delta's counts and state, this output's beginning
        return dataclasses.replace(
            delta,
            new_token_ids=self.new_token_ids + delta.new_token_ids,
            new_text=self.new_text + delta.new_text,
            new_logprobs=_joined(self.new_logprobs, delta.new_logprobs),
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time or delta.first_token_time,
        )


class ModelRunnerProtocol(Protocol):
    """What the engine needs from a model runner."""

    def execute_model(self, step: SchedulerOutput) -> dict[str, int]:
        """Run the step; return {request_id: sampled token} for every item with sample=True."""
        ...


def _default_detokenizer_factory(tokenizer: Any) -> Callable[[], Any]:
    from llcuda.gguf.detokenizer import IncrementalDetokenizer

    return lambda: IncrementalDetokenizer(tokenizer)


class LLMEngine:
    """Continuous-batching engine over a model runner and a tokenizer.

    model_runner: `execute_model(SchedulerOutput) -> {request_id: token_id}`; its optional
        `device` attribute (where logits live) is where seeded requests' generators are made.
    tokenizer: has `eog_ids` (a set of ids, or a method returning one) and optionally
        `vocab_size`, used to reject out-of-range prompt ids before they reach the embedding.
    detokenizer_factory: a callable returning a fresh per-request detokenizer with
        `push(id) -> str` and `flush() -> str`; default `IncrementalDetokenizer(tokenizer)`.
    enable_prefix_caching: overrides `config.enable_prefix_caching` (default: on).
    overlap: make the text of step N's tokens while step N+1 runs (default: on a GPU runner with
        `launch(step) -> handle.result()`). Outputs are then returned one step later; a stop
        string costs one wasted token of compute.
    decode_steps: the longest decode burst (config.num_scheduler_steps; None: the runner's
        `default_decode_steps`, else 1). A burst needs a runner whose `launch(step, num_steps)`
        chains decode steps on the device (`supports_decode_bursts`).

    With overlap and a runner whose `launch(step, num_steps, after=handle)` feeds a burst the
    tokens an unfinished one sampled (`supports_chained_bursts`), steady decoding queues the next
    burst before the current one's tokens reach the host: the GPU never waits for the host's
    scheduling, bookkeeping and launches between bursts. It is dropped unused if every request it
    feeds has ended meanwhile; tokens it samples for an ended request are dropped as after EOG.
    """

    def __init__(
        self,
        model_runner: ModelRunnerProtocol,
        tokenizer: Any,
        config: EngineConfig,
        *,
        detokenizer_factory: Callable[[], Any] | None = None,
        enable_prefix_caching: bool | None = None,
        overlap: bool | None = None,
        decode_steps: int | None = None,
    ) -> None:
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self.config = config
        if enable_prefix_caching is None:
            enable_prefix_caching = config.enable_prefix_caching
        # the runner's cache layout (full / sliding-window groups); one group for runners without
        groups = getattr(model_runner, "kv_cache_groups", None) or [
            KVCacheGroup(config.num_blocks, 0, ())
        ]
        self.block_manager = KVCacheManager(groups, config.block_size, enable_prefix_caching)
        eog = getattr(tokenizer, "eog_ids", ())
        self.eog_ids = frozenset(eog() if callable(eog) else eog)
        self.scheduler = Scheduler(config, self.block_manager, eog_ids=self.eog_ids)
        vocab = getattr(tokenizer, "vocab_size", None)
        self.vocab_size: int | None = vocab() if callable(vocab) else vocab
        self.device = torch.device(getattr(model_runner, "device", None) or "cpu")
        self._new_detokenizer = detokenizer_factory or _default_detokenizer_factory(tokenizer)
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []  # produced outside step(), returned by the next one
        # On a GPU, the tokens sampled by one step are turned into text during the next step's
        # forward pass (the host's detokenization hides behind the GPU instead of following it).
        if overlap is None:
            overlap = self.device.type == "cuda" and hasattr(model_runner, "launch")
        self._overlap = overlap
        # (request, tokens it got) sampled last step, text not yet made
        self._held: list[tuple[Request, int]] = []
        if decode_steps is None:
            decode_steps = config.num_scheduler_steps
        if decode_steps is None:
            decode_steps = getattr(model_runner, "default_decode_steps", 1)
        if not getattr(model_runner, "supports_decode_bursts", False):
            decode_steps = 1
        self.decode_steps = decode_steps
        self._chain = overlap and decode_steps > 1 and getattr(
            model_runner, "supports_chained_bursts", False
        )
        # (step, num_steps, handle) of a burst queued behind the one step() waits for
        self._ahead: tuple[SchedulerOutput, int, Any] | None = None
        self.num_steps = 0
        self._grammar_compiler: Any = None  # llcuda.structured's, made at the first constraint

    # --- requests -------------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (the checks of add_request, no state)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {params!r}")
        if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
            raise ValueError(
                f"prompt must be a list of token ids (tokenize text first), got "
                f"{type(prompt_token_ids).__name__}"
            )
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt must hold at least one token")
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"prompt token ids must be non-negative ints, got {t!r}")
            if self.vocab_size is not None and t >= self.vocab_size:
                raise ValueError(
                    f"prompt token id {t} is outside the vocabulary ({self.vocab_size})"
                )
        if params.logprobs is not None and not getattr(self.model_runner, "supports_logprobs",
                                                       False):  # fmt: skip
            raise ValueError("logprobs: this engine's model runner does not report log-probs")
        ctx = self.config.ctx_size
        if len(prompt_token_ids) > ctx - 1:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens but ctx_size is {ctx} "
                f"(at least one token must be left to generate)"
            )
        if params.structured is not None:
            # a grammar this vocabulary cannot take is refused here, not on the engine thread;
            # the first call builds the vocabulary's tables (~2 s at 262k tokens)
            self._compiler().check(params.structured)

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. max_tokens=0 finishes at the next step, no tokens.

        vLLM's argument order `add_request(request_id, prompt_token_ids, sampling_params)` is
        accepted too (a str first argument is an id: prompts are token ids here).
        """
        if isinstance(prompt_token_ids, str) and not isinstance(sampling_params, SamplingParams):
            request_id, prompt_token_ids, sampling_params = (
                prompt_token_ids,
                sampling_params,
                request_id,
            )
        params = SamplingParams() if sampling_params is None else sampling_params
        self.check_request(prompt_token_ids, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(
            request_id, list(prompt_token_ids), params, seed=self._seed(params), device=self.device
        )
        if params.max_tokens == 0:
            request.set_finished("length")
            self._pending.append(self._output(request, [], ""))
            return request_id
        request.detokenizer = self._new_detokenizer()
        if params.structured is not None:
            request.grammar = self._compiler().new_state(params.structured)
        self.scheduler.add_request(request)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Cancel a live request and free its blocks now; the next step() reports it finished."""
        request = self.scheduler.requests.get(request_id)
        if request is None or not self.scheduler.abort_request(request_id):
            return False
        self._pending.append(self._output(request, [], ""))
        return True

    def abort_all(self) -> list[str]:
        ids = list(self.scheduler.requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending or self._held)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # --- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch (or a decode burst); return a delta for every request that sampled,
        finished or was aborted."""
        outputs, self._pending = self._pending, []
        ahead, self._ahead = self._ahead, None
        if ahead is not None and any(
            item.request.status is RequestStatus.RUNNING for item in ahead[0].scheduled
        ):
            step, num_steps, launched = ahead  # queued by the previous step()
        else:
            step = self.scheduler.schedule()
            if step.is_empty:
                return outputs + self._process_held()
            num_steps = self._burst_length(step)
            launched = self._launch(step, num_steps)  # queued on the GPU, not waited for
        if self._overlap:
            if self._chain:
                self._ahead = self._chain_burst(step, num_steps, launched)
            outputs += self._process_held()
        sampled = launched.result()
        self.num_steps += num_steps
        before = {item.request_id: item.request.num_output_tokens for item in step.scheduled}
        finished = {r.request_id for r in self.scheduler.update_from_output(step, sampled)}
        finished |= self._advance_grammars(step, before)
        # requests finished before this step's token arrived (aborted; with overlap, a stop
        # string in the previous tokens) drop it
        self._held = [
            (item.request, item.request.num_output_tokens - before[item.request_id])
            for item in step.scheduled
            if item.sample and (not item.request.is_finished or item.request_id in finished)
        ]
        self._keep_logprobs(launched)
        if not self._overlap:
            outputs += self._process_held()
        return outputs

    def _burst_length(self, step: SchedulerOutput, ahead: int = 0) -> int:
        """How many decode steps to chain for this schedule: 1 unless every scheduled request
        decodes one token, none waits that could be admitted, no request's sampling reads its
        history (repeat penalty), and every sequence has room. A burst never outlasts the last
        sequence's max_tokens; while a request waits for a slot it ends where the first sequence
        reaches it. The KV blocks for the extra positions are reserved here (1 if the cache has
        none to spare). `ahead`: the steps of a burst still running before this one (a chained
        burst), whose tokens are not yet the requests' own."""
        limit = self.decode_steps
        if limit <= 1 or step.preempted_ids:
            return 1
        sched = self.scheduler
        if sched.waiting and sched.num_running < self.config.n_parallel:
            return 1  # admit the newcomer next step rather than after a burst
        room = self.config.ctx_size
        first_done = limit  # steps until the first sequence reaches its max_tokens
        last_done = 0  # ... and the last: steps past it would compute tokens nobody keeps
        for item in step.scheduled:
            params = item.request.sampling_params
            if item.num_tokens != 1 or not item.sample:
                return 1
            if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
                return 1
            if item.request.grammar is not None:
                return 1  # its next mask needs this token: the host's matcher goes step by step
            # the token sampled at position ctx_size - 2 fills the context and ends the request
            room = min(room, self.config.ctx_size - 1 - (item.start_pos + ahead))
            left = params.max_tokens - item.request.num_output_tokens - ahead
            first_done, last_done = min(first_done, left), max(last_done, left)
        num_steps = min(limit, room, last_done)
        if sched.waiting:
            # a request waits for a free slot: end the burst when the first one frees
            num_steps = min(num_steps, first_done)
        if num_steps <= 1:
            return 1
        for item in step.scheduled:
            if not self.block_manager.allocate_slots(item.request, ahead + num_steps):
                return 1  # blocks already reserved for others are used by their next steps
        return num_steps

    def _chain_burst(self, step: SchedulerOutput, num_steps: int, launched: Any
                     ) -> tuple[SchedulerOutput, int, Any] | None:  # fmt: skip
        """Queue the burst that follows `step` (a burst still running) for the same requests,
        fed on the device by the tokens it samples, as long as _burst_length allows; None when
        a request waits (the next schedule could admit it) or one has ended (a stop string, an
        abort). A request that meets EOG or its max_tokens within the running burst makes the
        next one's tokens for it wasted work, never wrong: they are dropped."""
        if num_steps < 2 or self.scheduler.waiting:
            return None
        if any(item.request.status is not RequestStatus.RUNNING for item in step.scheduled):
            return None
        chained_steps = self._burst_length(step, ahead=num_steps)
        if chained_steps < 2:
            return None
        chained = SchedulerOutput(
            scheduled=[ScheduledRequest(item.request, 1, item.start_pos + num_steps, True)
                       for item in step.scheduled],
            total_num_tokens=len(step.scheduled),
        )  # fmt: skip
        return chained, chained_steps, self.model_runner.launch(chained, chained_steps,
                                                                after=launched)  # fmt: skip

    def _launch(self, step: SchedulerOutput, num_steps: int = 1):
        # runners that take no bursts keep their one-argument methods
        args = (step, num_steps) if num_steps > 1 else (step,)
        launch = getattr(self.model_runner, "launch", None)
        if launch is not None:
            return launch(*args)
        return _Ready(self.model_runner.execute_model(*args))  # a runner with no async path

    def _keep_logprobs(self, launched: Any) -> None:
        """Give each request that asked the log-probs of the tokens it kept this step (the first
        ones of a burst, as update_from_output kept them), beside its output tokens."""
        wanted = [(r, n) for r, n in self._held if r.sampling_params.logprobs is not None]
        if not wanted:
            return
        got = launched.logprobs() if hasattr(launched, "logprobs") else {}
        for request, count in wanted:
            entries = got.get(request.request_id)
            if entries is None or len(entries) < count:
                raise RuntimeError(
                    f"model runner returned no log-probs for request {request.request_id!r}, "
                    f"which asked for them"
                )
            request.output_logprobs.extend(entries[:count])

    def _process_held(self) -> list[RequestOutput]:
        """Text and output deltas for the tokens sampled by the last step.

        With overlap, a request may meet a stop string here while its next token is already being
        computed: the scheduler finishes it now, and that step's token for it is dropped (its KV
        write lands in freed blocks before any later step can reuse them: one stream, in order).
        """
        held, self._held = self._held, []
        return [self._process_tokens(r, n) for r, n in held if r.finish_reason != "abort"]

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion, batched; one aggregated output per prompt, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        results: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                prev = results.get(out.request_id)
                results[out.request_id] = out if prev is None else prev.merge(out)
        return [results[i] for i in ids]

    # --- text -----------------------------------------------------------------------------------

    def _process_tokens(self, request: Request, count: int) -> RequestOutput:
        """Detokenize the request's newest `count` tokens, apply stop strings, build its delta.

        A stop string met before the last of them (a decode burst) ends the request there: the
        tokens after it are dropped from its output, as if never sampled.
        """
        new_ids = request.output_token_ids[len(request.output_token_ids) - count :]
        emitted: list[str] = []
        for i, token_id in enumerate(new_ids):
            last = i == len(new_ids) - 1
            # the scheduler saw EOG (a grammar that ended the request ended it on text)
            finished_by_eog = last and request.finish_reason == "stop" and token_id in self.eog_ids
            text = "" if finished_by_eog else request.detokenizer.push(token_id)
            final = last and request.is_finished
            if final:
                text += request.detokenizer.flush()
            piece, stopped = self._release_text(request, text, final=final)
            emitted.append(piece)
            if stopped:
                request.truncate_output(len(new_ids) - 1 - i)
                new_ids = new_ids[: i + 1]
                if request.is_finished:  # max_tokens / ctx_size hit on the same token: stop wins
                    request.set_finished("stop")
                else:
                    self.scheduler.finish_request(request.request_id, "stop")
                break
        return self._output(request, new_ids, "".join(emitted))

    def _release_text(self, request: Request, text: str, final: bool) -> tuple[str, bool]:
        """Add `text` to the held-back text; return (text safe to emit, stop string found)."""
        stops = request.sampling_params.stop
        pending = request.pending_text + text
        if not stops:
            request.pending_text = ""
            request.output_text += pending
            return pending, False
        cut = find_stop(pending, stops)
        if cut >= 0:
            emit = pending[:cut]
            request.pending_text = ""
            request.output_text += emit
            return emit, True
        hold = 0 if final else partial_stop_len(pending, stops)
        emit = pending[: len(pending) - hold]
        request.pending_text = pending[len(pending) - hold :]
        request.output_text += emit
        return emit, False

    def _output(self, request: Request, token_ids: list[int], text: str) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
            new_logprobs=_new_logprobs(request, len(token_ids)),
        )

    # --- structured output ----------------------------------------------------------------------

    def _compiler(self) -> Any:
        if self._grammar_compiler is None:
            from llcuda.structured.grammar_state import GrammarCompiler
            from llcuda.structured.vocabulary import llg_tokenizer

            self._grammar_compiler = GrammarCompiler(llg_tokenizer(self.tokenizer, self.eog_ids))
        return self._grammar_compiler

    def _advance_grammars(self, step: SchedulerOutput, before: dict[str, int]) -> set[str]:
        """Feed each constrained request the tokens this step gave it; end ("stop") those whose
        grammar is complete. A token the grammar refuses (only a bug could sample one) ends the
        request too, with the matcher's error logged. Returns the ids it ended."""
        ended: set[str] = set()
        for item in step.scheduled:
            request = item.request
            state = request.grammar
            if state is None or request.finish_reason == "abort":
                continue
            new = request.output_token_ids[before[item.request_id]:]
            if not new:
                continue
            ok = state.accept(new)
            if not ok:
                _log.error("request %s: sampled token broke its grammar: %s",
                           request.request_id, state.error)  # fmt: skip
            if not ok or state.is_finished:
                if request.is_finished:  # max_tokens on the grammar's last token: complete
                    request.set_finished("stop")
                elif self.scheduler.finish_request(request.request_id, "stop"):
                    ended.add(request.request_id)
        return ended

    def _seed(self, params: SamplingParams) -> int | None:
        # llama.cpp's --seed is every request's default seed
        return params.seed if params.seed is not None else self.config.seed


def _new_logprobs(request: Request, count: int) -> list[Any] | None:
    """The log-probs of the request's newest `count` output tokens; None if it asked for none."""
    if request.sampling_params.logprobs is None:
        return None
    logprobs = request.output_logprobs
    return logprobs[len(logprobs) - count :]


def _joined(a: list | None, b: list | None) -> list | None:
    return a + b if a is not None and b is not None else a if b is None else b


class _Ready:
    def __init__(self, sampled: dict[str, int]) -> None:
        self.sampled = sampled

    def result(self) -> dict[str, int]:
        return self.sampled


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest complete stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
