"""Data-parallel replicas on one host: N engines of one model behind one HTTP front.

`llcuda serve --replicas N` loads the model N times (replica i on cuda:i mod the GPUs there are,
or all on the CPU), each with its own continuous-batching loop, KV cache and thread, and sends
each new request to the replica with the fewest outstanding requests (submitted and not yet
finished; ties go round-robin), the "least request" policy of Envoy and the Kubernetes Gateway
API inference extension. /metrics then reports the replicas' totals (server/metrics.py).

ReplicaSet stands in for one InferenceEngine wherever the server uses one (create_app): it has
the same infer_stream / chat_stream / tokenize / model_info calls.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from llcuda.api import InferenceEngine
from llcuda.streams import TextStream


class ReplicaSet:
    """Loaded InferenceEngines of one model; new requests go to the least loaded."""

    def __init__(self, engines: list[InferenceEngine]):
        if not engines:
            raise ValueError("a ReplicaSet needs at least one loaded engine")
        self.engines = engines
        self._lock = threading.Lock()
        self._outstanding: list[list[TextStream]] = [[] for _ in engines]  # per replica
        self._turn = itertools.count()  # where ties start, so equal loads spread

    @classmethod
    def load(cls, model: str, replicas: int, verbose: bool = True, **load_kwargs: Any
             ) -> ReplicaSet:  # fmt: skip
        """Load `model` `replicas` times; on GPUs replica i takes cuda:(i mod device count)."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        devices = _replica_devices(replicas, load_kwargs.get("device"),
                                   load_kwargs.get("gpu_layers", 99))  # fmt: skip
        if load_kwargs.get("tensor_parallel_size", 1) > 1 and devices[0] != "cpu":
            raise ValueError(
                "replicas of a tensor-parallel model on GPUs are not placed yet (each would "
                "take cuda:0..tp-1); use --replicas with -tp 1, or -tp alone"
            )
        engines: list[InferenceEngine] = []
        try:
            for i, device in enumerate(devices):
                engine = InferenceEngine()
                engine.load_model(model, verbose=verbose and i == 0,
                                  **{**load_kwargs, "device": device})  # fmt: skip
                engines.append(engine)
        except BaseException:
            for engine in engines:
                engine.unload_model()
            raise
        return cls(engines)

    # --- routing --------------------------------------------------------------------------------

    def outstanding(self) -> list[int]:
        """Requests submitted to each replica and not yet finished."""
        with self._lock:
            return [len(self._prune(i)) for i in range(len(self.engines))]

    def _prune(self, replica: int) -> list[TextStream]:
        live = [s for s in self._outstanding[replica] if s.result is None]
        self._outstanding[replica] = live
        return live

    def _route(self, start) -> TextStream:
        """Submit on the least loaded replica (`start(engine)` makes the stream)."""
        with self._lock:
            n = len(self.engines)
            first = next(self._turn) % n
            order = [(first + k) % n for k in range(n)]
            replica = min(order, key=lambda i: len(self._prune(i)))
            stream = start(self.engines[replica])
            self._outstanding[replica].append(stream)
        return stream

    def infer_stream(self, prompt: str, **kwargs: Any) -> TextStream:
        return self._route(lambda engine: engine.infer_stream(prompt, **kwargs))

    def chat_stream(self, messages: Any, **kwargs: Any) -> TextStream:
        return self._route(lambda engine: engine.chat_stream(messages, **kwargs))

    def infer(self, prompt: str, **kwargs: Any):
        return self.infer_stream(prompt, **kwargs).consume()

    # --- what every replica shares ---------------------------------------------------------------

    @property
    def llm_engines(self) -> list:
        """Each replica's LLMEngine, for /metrics (read, never stepped)."""
        return [engine._loaded.llm_engine for engine in self.engines]

    @property
    def is_loaded(self) -> bool:
        return all(engine.is_loaded for engine in self.engines)

    def model_info(self) -> dict:
        info = self.engines[0].model_info()
        info["replicas"] = len(self.engines)
        info["replica_devices"] = [e.model_info()["device"] for e in self.engines]
        return info

    def memory_report(self) -> dict:
        """Replica 0's report; every replica holds the same."""
        return {**self.engines[0].memory_report(), "replicas": len(self.engines)}

    def _tool_call_stream(self, tools: Any) -> Any:
        """The tool-call parser (server/app.py); every replica has the same chat template."""
        return self.engines[0]._tool_call_stream(tools)

    def tokenize(self, *args: Any, **kwargs: Any) -> list[int]:
        return self.engines[0].tokenize(*args, **kwargs)

    def detokenize(self, ids) -> str:
        return self.engines[0].detokenize(ids)

    def unload_model(self) -> None:
        for engine in self.engines:
            engine.unload_model()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload_model()


def _replica_devices(replicas: int, device: str | None, gpu_layers: int) -> list[str]:
    import torch

    wanted = device
    if wanted is None:
        wanted = "cuda" if torch.cuda.is_available() and gpu_layers > 0 else "cpu"
    if wanted.startswith("cpu"):
        return ["cpu"] * replicas
    if ":" in wanted:
        raise ValueError(f"replicas are placed on cuda:0..N-1 themselves; got device={wanted!r}")
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(replicas)]
