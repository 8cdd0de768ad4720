"""A real `llcuda serve` app on a tiny synthetic Gemma 3, started once per module on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llcuda.api import InferenceEngine  # noqa: E402
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf  # noqa: E402

API_KEY = "test-key-123"
CTX_SIZE = 256
N_PARALLEL = 4


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(write_gemma3_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", **TINY))


@dataclass
class RunningServer:
    url: str
    engine: InferenceEngine
    server: object  # uvicorn.Server

    @property
    def llm_engine(self):
        return self.engine._loaded.llm_engine

    def client(self, key: str | None = API_KEY, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def slow_engine_steps(server, monkeypatch, seconds: float = 0.01) -> None:
    """Every engine step of `server` takes `seconds` longer (until monkeypatch undoes it): a
    240-token answer then lasts >= 2.4 s at 10 ms whatever the CPU's speed, so a test's client
    surely leaves before it ends."""
    llm = server.llm_engine
    step = llm.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(llm, "step", slow_step)


def engine_idle(server) -> bool:
    """No request running or waiting, and every KV block free (cached ones count as free)."""
    llm = server.llm_engine
    bm = llm.block_manager
    return llm.num_running == 0 and llm.num_waiting == 0 and bm.num_free_blocks == bm.num_blocks


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free port of 127.0.0.1 (no race between pick and bind)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(model: str, ctx_size: int = CTX_SIZE, **load_kwargs):
    """Load `model` on the CPU and serve it on a free port of 127.0.0.1; a generator that yields
    the RunningServer and stops it when resumed (for module-scoped fixtures)."""
    from llcuda.server.app import make_server

    engine = InferenceEngine()
    engine.load_model(model, ctx_size=ctx_size, n_parallel=N_PARALLEL, device="cpu",
                      verbose=False, **load_kwargs)  # fmt: skip
    sock = bound_socket()
    port = sock.getsockname()[1]
    srv = make_server(engine, "127.0.0.1", port, api_key=API_KEY, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive(), "the server thread died while starting"
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.02)
    yield RunningServer(f"http://127.0.0.1:{port}", engine, srv)
    srv.should_exit = True
    thread.join(15)
    sock.close()
    engine.unload_model()


@pytest.fixture(scope="module")
def server(tiny_model):
    yield from start_server(tiny_model)
