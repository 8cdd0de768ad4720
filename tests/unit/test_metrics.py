"""MetricsCollector: percentiles, busy-time throughput, thread safety, reset."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from llcuda.metrics import MetricsCollector, percentile


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(
    m: MetricsCollector, clock: FakeClock, seconds: float, *, generated=10, prompt=5, ttft=None
):
    start = m.start()
    clock.now += seconds
    return m.finish(start, prompt_tokens=prompt, generated_tokens=generated, ttft_ms=ttft)


def test_empty_snapshot_is_zeros():
    snap = MetricsCollector().snapshot()
    assert snap["latency"]["count"] == 0
    assert snap["latency"]["p95_ms"] == 0.0
    assert snap["throughput"]["tokens_per_sec"] == 0.0
    assert snap["throughput"]["total_requests"] == 0
    assert set(snap["latency"]) == {
        "mean_ms", "p50_ms", "p95_ms", "p99_ms", "min_ms", "max_ms",
        "ttft_mean_ms", "ttft_p50_ms", "ttft_p95_ms", "count",
    }  # fmt: skip
    assert set(snap["throughput"]) == {
        "tokens_per_sec", "requests_per_sec", "total_tokens", "total_requests",
        "prompt_tokens", "generated_tokens", "elapsed_s",
    }  # fmt: skip


@pytest.mark.parametrize("q", [0, 12.5, 50, 95, 99, 100])
def test_percentile_matches_numpy(q):
    values = sorted(np.random.default_rng(0).exponential(size=37).tolist())
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_latency_statistics():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        run(m, clock, seconds, ttft=seconds * 100)
    lat = m.snapshot()["latency"]
    assert lat["count"] == 4
    assert lat["mean_ms"] == pytest.approx(250.0)
    assert lat["min_ms"] == pytest.approx(100.0)
    assert lat["max_ms"] == pytest.approx(400.0)
    assert lat["p50_ms"] == pytest.approx(250.0)
    assert lat["ttft_mean_ms"] == pytest.approx(25.0)


def test_tokens_per_sec_ignores_idle_time():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    run(m, clock, 1.0, generated=50, prompt=7)
    clock.now += 60.0  # idle minute between calls
    run(m, clock, 1.0, generated=50, prompt=3)
    thr = m.snapshot()["throughput"]
    assert thr["elapsed_s"] == pytest.approx(2.0)
    assert thr["tokens_per_sec"] == pytest.approx(50.0)
    assert thr["requests_per_sec"] == pytest.approx(1.0)
    assert thr["prompt_tokens"] == 10
    assert thr["generated_tokens"] == 100
    assert thr["total_tokens"] == 110


def test_overlapping_requests_count_shared_time_once():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    a = m.start()
    clock.now += 0.5
    b = m.start()
    clock.now += 0.5
    m.finish(a, prompt_tokens=1, generated_tokens=20, ttft_ms=None)
    clock.now += 1.0
    m.finish(b, prompt_tokens=1, generated_tokens=20, ttft_ms=None)
    thr = m.snapshot()["throughput"]
    assert thr["elapsed_s"] == pytest.approx(2.0)
    assert thr["tokens_per_sec"] == pytest.approx(20.0)


def test_in_flight_time_counts_in_snapshot():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    m.start()
    clock.now += 3.0
    snap = m.snapshot()
    assert snap["throughput"]["elapsed_s"] == pytest.approx(3.0)
    assert snap["requests"]["in_flight"] == 1


def test_failed_requests_are_counted_apart():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    start = m.start()
    clock.now += 1.0
    m.finish(start, prompt_tokens=4, generated_tokens=0, ttft_ms=None, success=False)
    snap = m.snapshot()
    assert snap["requests"]["failed"] == 1
    assert snap["throughput"]["total_requests"] == 0
    assert snap["latency"]["count"] == 0


def test_finish_without_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        MetricsCollector().finish(0.0, prompt_tokens=0, generated_tokens=0, ttft_ms=None)


def test_reset():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    run(m, clock, 1.0)
    m.reset()
    snap = m.snapshot()
    assert snap["latency"]["count"] == 0
    assert snap["throughput"]["total_tokens"] == 0
    assert snap["throughput"]["elapsed_s"] == 0.0


def test_prefix_cache_hit_rate_over_prompt_tokens():
    clock = FakeClock()
    m = MetricsCollector(clock=clock)
    assert m.snapshot()["prefix_cache"] == {"cached_tokens": 0, "hit_rate": 0.0}
    for cached in (0, 30, 10):
        start = m.start()
        m.finish(start, prompt_tokens=40, generated_tokens=1, ttft_ms=1.0, cached_tokens=cached)
    start = m.start()  # a failed request counts no tokens
    m.finish(start, prompt_tokens=40, generated_tokens=0, ttft_ms=None, success=False,
             cached_tokens=40)  # fmt: skip
    assert m.snapshot()["prefix_cache"] == {"cached_tokens": 40, "hit_rate": pytest.approx(1 / 3)}
    m.reset()
    assert m.snapshot()["prefix_cache"]["cached_tokens"] == 0


def test_window_bounds_latency_samples_not_totals():
    clock = FakeClock()
    m = MetricsCollector(window=3, clock=clock)
    for seconds in (10.0, 0.1, 0.2, 0.3):
        run(m, clock, seconds)
    snap = m.snapshot()
    assert snap["latency"]["count"] == 3
    assert snap["latency"]["max_ms"] == pytest.approx(300.0)
    assert snap["throughput"]["total_requests"] == 4


def test_thread_safety():
    m = MetricsCollector()
    threads_n, per_thread = 8, 250

    def worker():
        for _ in range(per_thread):
            start = m.start()
            m.finish(start, prompt_tokens=2, generated_tokens=3, ttft_ms=1.0)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["throughput"]["total_requests"] == threads_n * per_thread
    assert snap["throughput"]["generated_tokens"] == 3 * threads_n * per_thread
    assert snap["requests"]["in_flight"] == 0
