"""`llcuda serve --replicas 2` as a real HTTP server: requests spread over both engines, and
/metrics carries vLLM's gauges (the replicas' totals) for Kubernetes inference routing."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llcuda.server.replicas import ReplicaSet
from tests.e2e.conftest import API_KEY, CTX_SIZE, N_PARALLEL, bound_socket


@pytest.fixture(scope="module")
def replica_server(tiny_model):
    from llcuda.server.app import make_server

    replicas = ReplicaSet.load(tiny_model, 2, verbose=False, ctx_size=CTX_SIZE,
                               n_parallel=N_PARALLEL, device="cpu")  # fmt: skip
    sock = bound_socket()
    port = sock.getsockname()[1]
    srv = make_server(replicas, "127.0.0.1", port, api_key=API_KEY, log_level="warning",
                      model_name="tiny")  # fmt: skip
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as c:
        yield replicas, c
    srv.should_exit = True
    thread.join(15)
    sock.close()
    replicas.unload_model()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_requests_spread_over_the_replicas(replica_server):
    replicas, client = replica_server

    def complete(i: int) -> dict:
        body = {"prompt": f"request {i}", "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(complete, range(8)))
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    # least-outstanding with round-robin ties: each replica ran some of them
    assert all(e.num_steps > 0 for e in replicas.llm_engines)
    assert replicas.outstanding() == [0, 0]
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_metrics_carry_vllm_gauges_summed_over_replicas(replica_server):
    replicas, client = replica_server
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # fmt: skip
        assert f'{name}{{model_name="tiny"}} ' in text
        assert 0 <= _metric(text, name)
    total = sum(e.block_manager.num_blocks for e in replicas.llm_engines)
    assert _metric(text, "llcuda_kv_cache_blocks_total") == total
