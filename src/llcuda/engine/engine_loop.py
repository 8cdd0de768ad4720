"""A background thread that steps an `LLMEngine` while work exists, and handles to its requests.

Only the stepping thread touches the engine. Other threads talk to it through an inbox
(add / abort commands, applied between steps) and get results through per-request queues, so a
submit never waits for a model step. With `auto_start=False` no thread runs: whoever waits on a
handle (or calls `run_until_complete`) steps the engine in its own thread, one stepper at a time.

Failure model: an exception from a step is delivered to every request in the engine at that
moment (as `EngineStepError`, the original as its cause); those requests are aborted, their blocks
freed, and the loop carries on with later requests.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from llcuda.engine.llm_engine import LLMEngine, RequestOutput
from llcuda.sampling_params import SamplingParams


class EngineStepError(RuntimeError):
    """A model step failed while this request was in the engine (see __cause__)."""


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class RequestHandle:
    """One submitted request: iterate its RequestOutput deltas, wait for `result()`, `abort()`."""

    def __init__(self, loop: EngineLoop, request_id: str, num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._loop = loop
        self._queue: queue.SimpleQueue[RequestOutput | _Failure] = queue.SimpleQueue()
        self._done = threading.Event()
        self._total: RequestOutput | None = None  # all deltas merged (written by the stepper)
        self._error: BaseException | None = None
        self._listener: Callable[[RequestOutput | BaseException], None] | None = None
        self._listen_lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[RequestOutput]:
        """Deltas as the engine produces them; ends after the finished one. Consumes them once."""
        while True:
            item = self._next_item()
            if item is None:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
            if item.finished:
                return

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the end; the merged output (all token ids and text). Raises the failure."""
        if self._loop.is_threaded:
            if not self._done.wait(timeout):
                raise TimeoutError(f"request {self.request_id!r} not finished after {timeout}s")
        else:
            while not self._done.is_set():
                if not self._loop.run_once():
                    raise RuntimeError(f"request {self.request_id!r} is stuck: engine has no work")
        if self._error is not None:
            raise self._error
        assert self._total is not None
        return self._total

    def listen(self, callback: Callable[[RequestOutput | BaseException], None]) -> None:
        """Hand every delta (or the failure, as the exception) to `callback` on the stepping
        thread instead of queueing it for iteration; deltas queued before this call go first, in
        order. For an event loop serving many requests: no thread needs to wait on each one.
        The callback must be quick and must not block."""
        with self._listen_lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                callback(item.exc if isinstance(item, _Failure) else item)
            self._listener = callback

    def abort(self) -> None:
        """Cancel the request (no-op once finished); its stream ends with finish_reason 'abort'."""
        if not self._done.is_set():
            self._loop._abort(self.request_id)

    # --- called by the stepping thread ----------------------------------------------------------

    def _deliver(self, out: RequestOutput) -> None:
        self._total = out if self._total is None else self._total.merge(out)
        self._hand_over(out)
        if out.finished:
            self._done.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._hand_over(_Failure(exc))
        self._done.set()

    def _hand_over(self, item: RequestOutput | _Failure) -> None:
        with self._listen_lock:
            if self._listener is None:
                self._queue.put(item)
                return
            listener = self._listener
        listener(item.exc if isinstance(item, _Failure) else item)

    def _next_item(self) -> RequestOutput | _Failure | None:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            if self._done.is_set():
                return None  # everything was consumed already
            if self._loop.is_threaded:
                return self._queue.get()
            if not self._loop.run_once():
                raise RuntimeError(f"request {self.request_id!r} is stuck: engine has no work")


class EngineLoop:
    """Runs `llm_engine.step()` on a background thread while requests exist.

    submit() is thread-safe and validates synchronously (bad prompts raise ValueError at once).
    shutdown() aborts everything (handles end with finish_reason 'abort') and joins the thread.
    """

    def __init__(self, llm_engine: LLMEngine, auto_start: bool = True) -> None:
        self.engine = llm_engine
        self._cond = threading.Condition()
        self._inbox: list[tuple[Any, ...]] = []  # ("add", handle, ids, params) | ("abort", id)
        self._step_lock = threading.Lock()  # one stepper at a time
        self._handles: dict[str, RequestHandle] = {}  # requests in the engine (stepper's)
        self._ids = itertools.count()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        if auto_start:
            self.start()

    @property
    def is_threaded(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("EngineLoop was shut down")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="llcuda-engine-loop", daemon=True
                )
                self._thread.start()

    # --- requests -------------------------------------------------------------------------------

    def submit(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> RequestHandle:
        params = SamplingParams() if params is None else params
        self.engine.check_request(prompt_token_ids, params)  # config-only: safe off-thread
        with self._cond:
            if self._stopping:
                raise RuntimeError("EngineLoop was shut down")
            if self._dead is not None:
                raise RuntimeError(f"EngineLoop thread died: {self._dead!r}") from self._dead
            handle = RequestHandle(self, f"loop-{next(self._ids)}", len(prompt_token_ids))
            self._inbox.append(("add", handle, list(prompt_token_ids), params))
            self._cond.notify()
        return handle

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """Submit all prompts together and wait for all; merged outputs in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return [h.result() for h in handles]

    def run_once(self) -> bool:
        """Apply queued commands and run one engine step; False when there was nothing to do."""
        with self._step_lock:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                return False
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the model failed: fail the requests, keep the loop
                self._fail_all(exc)
                return True
            for out in outputs:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue  # e.g. the abort record of a request failed earlier
                handle._deliver(out)
                if out.finished:
                    del self._handles[out.request_id]
            return True

    def run_until_complete(self) -> None:
        """Step in the calling thread until no request is left (for auto_start=False)."""
        while self.run_once():
            pass

    def shutdown(self, timeout: float | None = None) -> None:
        """Abort every request, stop and join the thread. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._step_lock:
            self._drain_inbox()
            for request_id in list(self._handles):
                self.engine.abort_request(request_id)
            try:
                outputs = self.engine.step()  # nothing left to schedule: the abort records
            except Exception as exc:
                self._fail_all(exc)
                return
            for out in outputs:
                handle = self._handles.pop(out.request_id, None)
                if handle is not None:
                    handle._deliver(out)
            for handle in self._handles.values():  # cannot happen; never leave one hanging
                handle._fail(RuntimeError("EngineLoop shut down"))
            self._handles.clear()

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- internals ------------------------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()
        # no thread to pick it up: free the blocks now, unless a step is under way (maybe in this
        # very thread: abort() can come from a stream's __del__ run by the garbage collector
        # mid-step); that stepper applies it at its next run_once.
        if not self.is_threaded and not self._stopping and self._step_lock.acquire(blocking=False):
            try:
                self._drain_inbox()
            finally:
                self._step_lock.release()

    def _drain_inbox(self) -> None:
        """Apply add / abort commands (stepper only, under _step_lock)."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for cmd in inbox:
            if cmd[0] == "add":
                _, handle, prompt, params = cmd
                if self._stopping:
                    handle._deliver(_aborted_output(handle))
                    continue
                try:
                    self.engine.add_request(prompt, params, request_id=handle.request_id)
                except Exception as exc:
                    handle._fail(exc)
                    continue
                self._handles[handle.request_id] = handle
            elif cmd[1] in self._handles:
                self.engine.abort_request(cmd[1])  # its record comes out of the next step

    def _fail_all(self, exc: BaseException) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():  # first: whatever happens next, nobody hangs
            err = EngineStepError(f"model step failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            handle._fail(err)
        self.engine.abort_all()  # free their blocks; their abort records are dropped

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (
                        not self._stopping
                        and not self._inbox
                        and not self.engine.has_unfinished_requests()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        return
                self.run_once()
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never hang
            with self._cond:
                self._dead = exc
                inbox, self._inbox = self._inbox, []
            for cmd in inbox:
                if cmd[0] == "add":
                    cmd[1]._fail(RuntimeError(f"EngineLoop thread died: {exc!r}"))
            try:
                self._fail_all(exc)
            except Exception:
                pass  # the engine is beyond repair; every handle has its error already
            raise


def _aborted_output(handle: RequestHandle) -> RequestOutput:
    return RequestOutput(
        request_id=handle.request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason="abort",
        num_prompt_tokens=handle.num_prompt_tokens,
        num_output_tokens=0,
        finished_time=time.monotonic(),
    )
