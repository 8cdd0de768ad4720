"""Request metrics for `InferenceEngine.get_metrics()`: latency percentiles and throughput.

Definitions (what the numbers mean, so that benchmarks compare like with like):
- latency_ms: from the moment a request is handed to the engine to its last token.
- ttft_ms: from the same moment to its first generated token (prefill plus one sample).
- elapsed_s ("busy time"): the wall time during which at least one request was in flight.
  Idle gaps between calls are not counted, so a user who waits a minute between two `infer`
  calls does not see throughput drop; overlapping requests count their shared time once.
- tokens_per_sec: generated tokens / elapsed_s (prompt tokens are not counted).
- requests_per_sec: finished requests / elapsed_s.
- prefix_cache.hit_rate: prompt tokens served by the prefix cache (their KV blocks were reused,
  not computed) / prompt tokens, over finished requests.
Latency and TTFT statistics cover the most recent `window` finished requests (default 10,000)
so a long-running server keeps bounded memory; the totals cover everything since `reset()`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Sample:
    latency_ms: float
    ttft_ms: float | None


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    frac = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


class MetricsCollector:
    """Thread-safe collector: `start()` when a request is submitted, `finish()` when it ends."""

    def __init__(self, window: int = 10_000, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0  # survives reset(): those requests are still running
        self.reset()

    def reset(self) -> None:
        """Forget every finished request. Requests in flight still count their busy time."""
        with self._lock:
            self._samples: deque[_Sample] = deque(maxlen=self._window)
            self._total_requests = 0
            self._failed_requests = 0
            self._prompt_tokens = 0
            self._cached_tokens = 0
            self._generated_tokens = 0
            self._busy_s = 0.0
            self._busy_since = self._clock()  # an in-flight request's busy time restarts here

    def start(self) -> float:
        """Mark a request as in flight; returns its start time (pass it to `finish`)."""
        with self._lock:
            now = self._clock()
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1
            return now

    def finish(
        self,
        start_time: float,
        *,
        prompt_tokens: int,
        generated_tokens: int,
        ttft_ms: float | None,
        success: bool = True,
        cached_tokens: int = 0,
    ) -> float:
        """Record a finished request; returns its latency in ms."""
        with self._lock:
            now = self._clock()
            if self._in_flight <= 0:
                raise RuntimeError("MetricsCollector.finish() called without a matching start()")
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_s += now - self._busy_since
            latency_ms = (now - start_time) * 1000.0
            if not success:
                self._failed_requests += 1
                return latency_ms
            self._samples.append(_Sample(latency_ms, ttft_ms))
            self._total_requests += 1
            self._prompt_tokens += prompt_tokens
            self._cached_tokens += cached_tokens
            self._generated_tokens += generated_tokens
            return latency_ms

    def snapshot(self) -> dict:
        with self._lock:
            now = self._clock()
            busy = self._busy_s + (now - self._busy_since if self._in_flight else 0.0)
            latencies = sorted(s.latency_ms for s in self._samples)
            ttfts = sorted(s.ttft_ms for s in self._samples if s.ttft_ms is not None)
            total_tokens = self._prompt_tokens + self._generated_tokens
            return {
                "latency": {
                    "mean_ms": sum(latencies) / len(latencies) if latencies else 0.0,
                    "p50_ms": percentile(latencies, 50),
                    "p95_ms": percentile(latencies, 95),
                    "p99_ms": percentile(latencies, 99),
                    "min_ms": latencies[0] if latencies else 0.0,
                    "max_ms": latencies[-1] if latencies else 0.0,
                    "ttft_mean_ms": sum(ttfts) / len(ttfts) if ttfts else 0.0,
                    "ttft_p50_ms": percentile(ttfts, 50),
                    "ttft_p95_ms": percentile(ttfts, 95),
                    "count": len(latencies),
                },
                "throughput": {
                    "tokens_per_sec": self._generated_tokens / busy if busy > 0 else 0.0,
                    "requests_per_sec": self._total_requests / busy if busy > 0 else 0.0,
                    "total_tokens": total_tokens,
                    "total_requests": self._total_requests,
                    "prompt_tokens": self._prompt_tokens,
                    "generated_tokens": self._generated_tokens,
                    "elapsed_s": busy,
                },
                "requests": {
                    "in_flight": self._in_flight,
                    "failed": self._failed_requests,
                },
                "prefix_cache": {
                    "cached_tokens": self._cached_tokens,
                    "hit_rate": (
                        self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0
                    ),
                },
            }
