"""Prometheus text exposition for the server: counters, histograms and engine gauges.

Written out rather than taken from prometheus_client: a dozen series do not need a dependency.
Metric names follow vLLM's where one exists (`llcuda:` prefix replaced by `llcuda_` for Prometheus'
name rules), so dashboards carry over with a prefix change.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

# seconds; TTFT matters from milliseconds (GPU decode) to tens of seconds (a long queue)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0)  # fmt: skip
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {cumulative}"]
        return out


class ServerMetrics:
    """Thread-safe request counters and histograms; `render(gauges)` gives the /metrics text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, finish reason) -> count
        self.http_errors: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def observe_request(
        self, endpoint: str, finish_reason: str | None, prompt_tokens: int,
        generated_tokens: int, ttft_s: float | None, latency_s: float,
    ) -> None:  # fmt: skip
        with self._lock:
            key = (endpoint, finish_reason or "error")
            self.requests[key] = self.requests.get(key, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.latency.observe(latency_s)

    def observe_error(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.http_errors[key] = self.http_errors.get(key, 0) + 1

    def render(
        self,
        gauges: dict[str, tuple[str, float]],
        counters: dict[str, tuple[str, float]] | None = None,
    ) -> str:
        """Prometheus text format 0.0.4; gauges and counters: name -> (help, value)."""
        with self._lock:
            lines = [
                "# HELP llcuda_requests_total Generation requests finished, by finish reason.",
                "# TYPE llcuda_requests_total counter",
            ]
            for (endpoint, reason), n in sorted(self.requests.items()):
                lines.append(
                    f'llcuda_requests_total{{endpoint="{endpoint}",finish_reason="{reason}"}} {n}'
                )
            lines += [
                "# HELP llcuda_http_errors_total Requests answered with an error status.",
                "# TYPE llcuda_http_errors_total counter",
            ]
            for (endpoint, status), n in sorted(self.http_errors.items()):
                labels = f'endpoint="{endpoint}",status="{status}"'
                lines.append(f"llcuda_http_errors_total{{{labels}}} {n}")
            lines += _counter("llcuda_prompt_tokens_total", "Prompt tokens processed.",
                              self.prompt_tokens)  # fmt: skip
            lines += _counter("llcuda_generation_tokens_total", "Tokens generated.",
                              self.generation_tokens)  # fmt: skip
            lines += [
                "# HELP llcuda_time_to_first_token_seconds Submission to first generated token.",
                "# TYPE llcuda_time_to_first_token_seconds histogram",
                *self.ttft.lines("llcuda_time_to_first_token_seconds"),
                "# HELP llcuda_e2e_request_latency_seconds Submission to last token.",
                "# TYPE llcuda_e2e_request_latency_seconds histogram",
                *self.latency.lines("llcuda_e2e_request_latency_seconds"),
            ]
        for name, (help_text, value) in (counters or {}).items():
            lines += _counter(name, help_text, value)
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _counter(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]


def _engines(llm_engines: object) -> list:
    """One LLMEngine or the replicas' list (server/replicas.py): the gauges are their totals."""
    return list(llm_engines) if isinstance(llm_engines, (list, tuple)) else [llm_engines]


def engine_gauges(llm_engines: object, in_flight: Callable[[], int]
                  ) -> dict[str, tuple[str, float]]:  # fmt: skip
    """KV cache use and queue lengths, read from the engine(s) without their locks: a gauge may
    be one step stale, never wrong by more. Summed over replicas."""
    engines = _engines(llm_engines)
    bms = [e.block_manager for e in engines]
    used = sum(bm.num_used_blocks for bm in bms)
    total = sum(bm.num_blocks for bm in bms)
    queried = sum(bm.prefix_cache_stats.num_queried_tokens for bm in bms)
    hits = sum(bm.prefix_cache_stats.num_hit_tokens for bm in bms)
    return {
        "llcuda_kv_cache_usage_ratio": ("Fraction of KV blocks held by live requests.",
                                        used / total),
        "llcuda_kv_cache_blocks_used": ("KV blocks held by live requests.", used),
        "llcuda_kv_cache_blocks_total": ("KV blocks in the cache.", total),
        "llcuda_prefix_cache_blocks": ("KV blocks findable by prefix hash (held or free; the "
                                       "free ones are evicted on demand).",
                                       sum(bm.num_cached_blocks for bm in bms)),
        "llcuda_prefix_cache_hit_ratio": ("Prompt tokens found in the prefix cache / tokens "
                                          "looked up, since start.",
                                          hits / queried if queried else 0.0),
        "llcuda_num_requests_running": ("Requests in the running batch.",
                                        sum(e.num_running for e in engines)),
        "llcuda_num_requests_waiting": ("Requests queued for admission.",
                                        sum(e.num_waiting for e in engines)),
        "llcuda_http_requests_in_flight": ("Generation requests the server is answering.",
                                           in_flight()),
    }  # fmt: skip


def engine_counters(llm_engines: object) -> dict[str, tuple[str, float]]:
    """Prefix-cache lookups since start, in tokens (vLLM's prefix_cache_queries / _hits)."""
    stats = [e.block_manager.prefix_cache_stats for e in _engines(llm_engines)]
    return {
        "llcuda_prefix_cache_queries_total": ("Tokens looked up in the prefix cache on admission.",
                                              sum(s.num_queried_tokens for s in stats)),
        "llcuda_prefix_cache_hits_total": ("Tokens the prefix cache held (not computed again).",
                                           sum(s.num_hit_tokens for s in stats)),
    }  # fmt: skip


def vllm_gauges(llm_engines: object, model_name: str) -> str:
    """vLLM's queue and KV gauges under vLLM's own names and `model_name` label, the ones
    Kubernetes inference routing scrapes from each server to pick the least loaded (the Gateway
    API inference extension's endpoint picker, llm-d): vllm:num_requests_running,
    vllm:num_requests_waiting, vllm:kv_cache_usage_perc (a fraction, 0-1, as vLLM reports it)
    and its older name vllm:gpu_cache_usage_perc. Totals over the replicas."""
    gauges = engine_gauges(llm_engines, lambda: 0)
    usage = gauges["llcuda_kv_cache_usage_ratio"][1]
    label = '{model_name="' + _escape_label(model_name) + '"}'
    series = [
        ("vllm:num_requests_running", "Requests in the running batch.",
         gauges["llcuda_num_requests_running"][1]),
        ("vllm:num_requests_waiting", "Requests queued for admission.",
         gauges["llcuda_num_requests_waiting"][1]),
        ("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", usage),
        ("vllm:gpu_cache_usage_perc", "KV-cache usage: 1 means 100 percent (vLLM's older "
         "name).", usage),
    ]  # fmt: skip
    lines = []
    for name, help_text, value in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{label} {value}"]
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    """Prometheus label value escaping: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
