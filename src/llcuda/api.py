"""InferenceEngine: the public facade (load a GGUF model, generate, stream, chat, metrics).

    from llcuda import InferenceEngine
    with InferenceEngine() as engine:
        engine.load_model("gemma-3-270m-Q4_K_M")
        print(engine.infer("Explain KV caches", max_tokens=64).text)

Requests run on an `EngineLoop`: a background thread that steps the continuous-batching engine,
so `infer` calls from several threads, and `batch_infer`, share every forward pass. With
`load_model(..., auto_start=False)` no thread is started: the calling thread drives the engine
itself inside `infer`/`batch_infer`/streams (call `start()` later to switch to the thread).

`create_completion` / `create_chat_completion` return OpenAI-shaped dicts, as llama-cpp-python's
`Llama` does, so code written for it carries over.

`InferenceEngine(server_url="http://127.0.0.1:8080")` sends the same calls to a running
`llcuda serve` (or llama-server) instead: no load_model, the same argument checks and the same
`InferResult`s (see llcuda.remote). Each public method checks its arguments, then hands the
request to the local engine or, when `self._remote` is set, to the server.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from llcuda import openai_format
from llcuda.config import EngineConfig
from llcuda.hub import resolve_model
from llcuda.metrics import MetricsCollector
from llcuda.remote import UNTIL_FULL, RemoteBackend, RemoteStream
from llcuda.sampling_params import DEFAULT_TEMPERATURE, SamplingParams
from llcuda.streams import InferResult, TextStream

# infer(**kwargs) may set these SamplingParams fields beyond the explicit arguments (logprobs=N:
# each token's log-prob and its N most likely alternatives in InferResult.logprobs)
_EXTRA_SAMPLING_ARGS = ("min_p", "repeat_penalty", "repeat_last_n", "ignore_eos", "logprobs")
# ... and these name a structured-output constraint (llcuda.structured.request_args)
_CONSTRAINT_ARGS = ("response_format", "grammar", "json_schema")
# load_model(**kwargs) may set these EngineConfig fields beyond the explicit arguments
_EXTRA_ENGINE_ARGS = (
    "block_size", "device", "seed", "enable_prefix_caching", "num_scheduler_steps", "swa_full",
    "tensor_parallel_size", "n_threads",
)


class InferenceEngine:
    """Load one GGUF model and run requests on it. Thread-safe; usable as a context manager.

    With `server_url`, requests go to that running server (its model; no load_model needed);
    `api_key` is its `--api-key`, `timeout` the seconds to wait for any answer from it.
    """

    def __init__(self, server_url: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0) -> None:  # fmt: skip
        self._lock = threading.RLock()
        self._loaded: Any = None  # llcuda.engine.loader.LoadedModel
        self._loop: Any = None  # llcuda.engine.engine_loop.EngineLoop
        self._model_path: str | None = None
        self._load_time_s = 0.0
        self._metrics = MetricsCollector()
        self._remote: RemoteBackend | None = None
        self._logprob_format_cache: tuple | None = None  # (tokenizer, its TokenLogprobFormat)
        if server_url is not None:
            self._remote = RemoteBackend(server_url, api_key, timeout)
        elif api_key is not None:
            raise ValueError("api_key is only used with server_url")

    # --- lifecycle ------------------------------------------------------------------------------

    def load_model(
        self,
        model: str | os.PathLike,
        gpu_layers: int = 99,
        ctx_size: int = 2048,
        batch_size: int = 512,
        ubatch_size: int = 128,
        n_parallel: int | None = None,
        cache_size: int | None = None,
        flash_attn: bool | None = None,
        auto_start: bool = True,
        verbose: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> bool:
        """Load `model` (a .gguf path, a known name, or 'owner/repo:file.gguf'); True on success.

        Knobs have llama.cpp's meanings (see EngineConfig). n_parallel=None (or -1), the
        default, is llama-server's automatic `-np -1`: 4 sequences sharing one KV pool of
        ctx_size tokens, so that concurrent calls and batch_infer batch without more KV memory
        than one context; an integer gives that many slots of ctx_size each (cache_size
        overrides the pool's size). Extra keyword arguments may set
        EngineConfig's block_size, device ('cpu'/'cuda'), n_threads (CPU threads, llama.cpp's
        -t; default one per physical core), seed, enable_prefix_caching (default
        True: prompts sharing a prefix reuse its KV blocks), num_scheduler_steps (decode steps
        chained on the GPU per scheduling round; default 16 on a GPU), swa_full (default
        False: sliding-window layers keep only the KV blocks their window sees, as llama.cpp)
        and tensor_parallel_size (default 1: every layer split over that many processes,
        one per GPU, or on the CPU with gloo; llcuda/parallel/).
        Bad values raise ValueError naming the argument; a missing or unreadable file raises
        FileNotFoundError / ValueError. A model already loaded is unloaded first.
        """
        if self._remote is not None:
            raise RuntimeError(
                f"this engine sends its requests to {self._remote.url}, which has its model "
                f"loaded: load_model is not used with server_url"
            )
        unknown = sorted(set(kwargs) - set(_EXTRA_ENGINE_ARGS))
        if unknown:
            raise ValueError(
                f"unknown load_model argument(s) {', '.join(unknown)}; "
                f"extra arguments may be: {', '.join(_EXTRA_ENGINE_ARGS)}"
            )
        _check_bool(auto_start, "auto_start")
        _check_bool(verbose, "verbose")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(
                f"chat_template must be a Jinja template string, got {chat_template!r}"
            )
        config = EngineConfig(
            gpu_layers=gpu_layers, ctx_size=ctx_size, batch_size=batch_size,
            ubatch_size=ubatch_size, n_parallel=n_parallel, cache_size=cache_size,
            flash_attn=flash_attn, **kwargs,
        )  # fmt: skip
        path = resolve_model(model, verbose=verbose)

        from llcuda.engine.loader import load  # heavy (torch, model code): only when used

        with self._lock:
            self.unload_model()
            t0 = time.perf_counter()
            loaded = load(str(path), config, verbose=verbose, chat_template=chat_template)
            self._load_time_s = time.perf_counter() - t0
            try:
                from llcuda.engine.engine_loop import EngineLoop

                self._loop = EngineLoop(loaded.llm_engine, auto_start=auto_start)
            except BaseException:
                loaded.close()
                raise
            self._loaded = loaded
            self._model_path = str(path)
            self._metrics.reset()
        if verbose:
            for line in _load_notices(loaded):
                print(f"llcuda: {line}", file=sys.stderr, flush=True)
        return True

    def start(self) -> None:
        """Start the background engine thread (load_model does, unless auto_start=False)."""
        if self._remote is not None:
            return  # the server runs its own
        with self._lock:
            self._require_loaded()
            self._loop.start()

    def unload_model(self) -> None:
        """Stop the engine thread and free the model, KV cache and file mapping. Idempotent.

        With server_url: close this client (the server and its model keep running).
        """
        if self._remote is not None:
            self._remote.close()
            return
        with self._lock:
            loop, loaded = self._loop, self._loaded
            self._loop, self._loaded, self._model_path = None, None, None
            if loop is not None:
                loop.shutdown()  # aborts what is still running; their streams end with "abort"
            if loaded is None:
                return
            device = str(loaded.device)
            loaded.close()
            del loaded, loop
            gc.collect()
            if device.startswith("cuda"):
                import torch

                # cuBLAS keeps a workspace (32 MiB) in torch's allocator per stream: hand it back
                # too, so that memory_allocated() returns to what it was before load_model
                clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
                if clear_workspaces is not None:
                    clear_workspaces()
                torch.cuda.empty_cache()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload_model()

    @property
    def is_loaded(self) -> bool:
        if self._remote is not None:
            return not self._remote.closed
        return self._loaded is not None

    def model_info(self) -> dict:
        """What is loaded: file, architecture, size, shape, device, chat template, engine knobs.

        The knobs are the effective ones: `gpu_layers` counts the layers really on the GPU as
        llama.cpp's -ngl does (the blocks, plus one for the output head; 0 on the CPU, where
        `flash_attn` is False too), `n_parallel` the slots an automatic setting resolved to
        (`n_parallel_auto` says it was one), `cache_size` the KV pool's tokens over all slots.
        `chat_template` names the template chat uses and `chat_template_source` where it came
        from (None and the reason where there is none: chat then raises).
        With server_url: server_url, name, and what the server's GET /v1/models says of it.
        """
        if self._remote is not None:
            return self._remote.model_info()
        loaded = self._require_loaded()
        mc, ec, gguf = loaded.model_config, loaded.engine_config, loaded.gguf
        on_cpu = str(loaded.device) == "cpu"
        template = loaded.chat_template
        return {
            "path": self._model_path,
            "name": mc.name,
            "architecture": mc.architecture,
            "parameters": sum(t.n_elements for t in gguf.tensors.values()),
            "file_size": gguf.file_size,
            "vocab_size": mc.vocab_size,
            "context_length": mc.max_position_embeddings,
            "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size,
            "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "device": str(loaded.device),
            "ctx_size": ec.ctx_size,
            "n_parallel": ec.n_parallel,
            "n_parallel_auto": ec.n_parallel_auto,
            "cache_size": ec.num_cache_tokens,
            "batch_size": ec.batch_size,
            "ubatch_size": ec.ubatch_size,
            "gpu_layers": 0 if on_cpu else min(ec.gpu_layers, mc.num_layers + 1),
            "flash_attn": False if on_cpu else ec.flash_attn,
            "tensor_parallel_size": ec.tensor_parallel_size,
            "chat_template": getattr(template, "name", None) if template.available else None,
            "chat_template_source": template.origin,
            "background_thread": self._loop.is_threaded,
            "load_time_s": self._load_time_s,
        }

    def memory_report(self) -> dict:
        """Bytes held by the loaded model (weights, kv_cache, ...) and, on CUDA, by torch."""
        if self._remote is not None:
            raise RuntimeError(
                f"memory_report describes a model in this process; {self._remote.url} reports "
                f"its KV-cache use at GET /metrics"
            )
        loaded = self._require_loaded()
        report: dict[str, Any] = {"device": str(loaded.device), **loaded.memory}
        report["total"] = sum(v for v in loaded.memory.values() if isinstance(v, int))
        if str(loaded.device).startswith("cuda"):
            import torch

            report["cuda_allocated"] = torch.cuda.memory_allocated()
            report["cuda_reserved"] = torch.cuda.memory_reserved()
            report["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        return report

    # --- generation -----------------------------------------------------------------------------

    def infer(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> InferResult:
        """Complete `prompt`. Bad arguments raise ValueError; engine errors give success=False."""
        params = _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, kwargs)
        return _with_structure(self._start_prompt(prompt, params).consume(), params)

    def infer_stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> TextStream | RemoteStream:
        """Like infer, but yields text pieces as they are produced (see TextStream)."""
        params = _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, kwargs)
        return self._start_prompt(prompt, params)

    def batch_infer(
        self,
        prompts: Iterable[str],
        max_tokens: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> list[InferResult]:
        """Submit every prompt at once so the scheduler batches them; results in prompt order."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string (use infer)")
        prompts = list(prompts)
        params = _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, kwargs)
        if self._remote is not None:  # concurrent requests: the server batches them
            checked = [_check_text(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
            return self._remote.batch(checked, params, self._metrics)
        encoded = [self._encode_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        streams = [self._submit(ids, dataclasses.replace(params)) for ids in encoded]
        return [_with_structure(s.consume(), params) for s in streams]

    def chat(
        self,
        messages: list[dict],
        max_tokens: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> InferResult:
        """Answer a conversation ([{"role": "user", "content": "..."}]) with the chat template.

        tools / tool_choice (OpenAI's): the result's tool_calls are parsed from the answer."""
        tools = _pop_tools(kwargs)
        params = _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, kwargs)
        params = self._tool_params(params, tools)
        result = self._start_chat(messages, params, tools).consume()
        return _with_structure(result, params, tools, self._tool_format())

    def chat_stream(
        self,
        messages: list[dict],
        max_tokens: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> TextStream | RemoteStream:
        """Like chat, but yields text pieces (tool calls are not parsed: see
        create_chat_completion(stream=True) for streamed tool_calls)."""
        tools = _pop_tools(kwargs)
        params = _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, kwargs)
        return self._start_chat(messages, self._tool_params(params, tools), tools)

    # --- tokens, metrics ------------------------------------------------------------------------

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        _check_text(text, "text")
        _check_bool(add_special, "add_special")
        _check_bool(parse_special, "parse_special")
        if self._remote is not None:
            return self._remote.tokenize(text, add_special, parse_special)
        tok = self._require_loaded().tokenizer
        return list(tok.encode(text, add_special=add_special, parse_special=parse_special))

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self._remote is not None:  # the server checks the ids against its vocabulary
            return self._remote.detokenize(_check_token_ids(ids, "ids"))
        loaded = self._require_loaded()
        return loaded.tokenizer.decode(_check_token_ids(ids, "ids", loaded.model_config.vocab_size))

    def get_metrics(self) -> dict:
        """Latency and throughput since load or reset_metrics() (definitions: llcuda.metrics)."""
        return self._metrics.snapshot()

    def reset_metrics(self) -> None:
        self._metrics.reset()

    # --- OpenAI-shaped results (llama-cpp-python's Llama.create_completion and friends) ----------

    def create_completion(
        self,
        prompt: str | list[int],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        stop: str | list[str] | None = None,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        echo: bool = False,
        response_format: dict | None = None,
        grammar: str | None = None,
        json_schema: dict | str | None = None,
        logprobs: int | None = None,
    ) -> dict | Iterator[dict]:
        """A `text_completion` dict (or, with stream=True, an iterator of chunks). logprobs=N
        (0-20): OpenAI's legacy `choices[].logprobs` with N alternatives per token.

        response_format / grammar (GBNF) / json_schema constrain the output (one of them)."""
        _check_bool(stream, "stream")
        _check_bool(echo, "echo")
        _check_openai_logprobs(logprobs, "logprobs")
        if logprobs is not None and echo:
            raise ValueError("logprobs with echo (the prompt's log-probs) is not supported")
        if isinstance(prompt, str):  # with server_url, the server tokenizes it
            ids = None if self._remote is not None else self._encode_prompt(prompt)
        else:
            ids = self._check_ids(prompt)
        params = _sampling_params(
            self._openai_max_tokens(max_tokens, ids), temperature, top_k, top_p, seed, stop,
            {"min_p": min_p, "repeat_penalty": repeat_penalty, "logprobs": logprobs,
             **_constraint_args(response_format, grammar, json_schema)},
        )  # fmt: skip
        prefix = (prompt if isinstance(prompt, str) else self.detokenize(ids)) if echo else ""
        if self._remote is not None:
            _local_only(params)
            text_stream = self._remote.complete(ids or prompt, params, self._metrics)
        else:
            text_stream = self._submit(ids, params)
        body = openai_format.completion_chunks if stream else openai_format.completion
        return body(text_stream, prefix, self._model_name())

    def create_chat_completion(
        self,
        messages: list[dict],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        repeat_penalty: float = 1.0,
        response_format: dict | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        grammar: str | None = None,
        json_schema: dict | str | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> dict | Iterator[dict]:
        """A `chat.completion` dict (or, with stream=True, `chat.completion.chunk` dicts).
        logprobs=True: `choices[].logprobs.content`, with top_logprobs (0-20) alternatives.

        response_format / grammar / json_schema constrain the answer; tools + tool_choice
        ("auto", "none", "required" or {"type": "function", "function": {"name": ...}}) give
        `message.tool_calls` (streamed as `delta.tool_calls`), finish_reason "tool_calls"."""
        _check_bool(stream, "stream")
        num_logprobs = _chat_logprobs(logprobs, top_logprobs)
        spec = _pop_tools({"tools": tools, "tool_choice": tool_choice})
        if self._remote is not None:  # the server applies its chat template
            messages, ids = _check_messages(messages), None
        else:
            ids = self._encode_chat(messages, spec)
        params = _sampling_params(
            self._openai_max_tokens(max_tokens, ids), temperature, top_k, top_p, seed, stop,
            {"min_p": min_p, "repeat_penalty": repeat_penalty, "logprobs": num_logprobs,
             **_constraint_args(response_format, grammar, json_schema)},
        )  # fmt: skip
        params = self._tool_params(params, spec)
        if ids is None:
            text_stream = self._start_chat(messages, params, spec)
        else:
            text_stream = self._submit(ids, params)
        body = openai_format.chat_chunks if stream else openai_format.chat_completion
        return body(text_stream, self._model_name(), self._tool_call_stream(spec))

    # --- internals ------------------------------------------------------------------------------

    def _start_prompt(self, prompt: Any, params: SamplingParams) -> TextStream | RemoteStream:
        """Submit one completion request, to the local engine or to the server."""
        if self._remote is not None:
            _local_only(params)
            return self._remote.complete(_check_text(prompt, "prompt"), params, self._metrics)
        return self._submit(self._encode_prompt(prompt), params)

    def _start_chat(self, messages: Any, params: SamplingParams,
                    tools: Any = None) -> TextStream | RemoteStream:  # fmt: skip
        if self._remote is not None:
            _local_only(params, tools)
            return self._remote.chat(_check_messages(messages), params, self._metrics)
        return self._submit(self._encode_chat(messages, tools), params)

    def _tool_format(self) -> str:
        from llcuda.structured.tool_calls import tool_format

        loaded = self._loaded
        return tool_format(getattr(loaded.chat_template, "source", "") if loaded else "")

    def _tool_call_stream(self, tools: Any) -> Any:
        """The parser of the tool calls in an answer to `tools` (a ToolSpec), in the model's
        format; None without tools or with tool_choice "none"."""
        if tools is None or tools.choice == "none":
            return None
        from llcuda.structured.tool_calls import ToolCallStream

        return ToolCallStream(self._tool_format(), tools.names)

    def _tool_params(self, params: SamplingParams, tools: Any) -> SamplingParams:
        """params with tool_choice required / named's grammar (a call in the model's format)."""
        if tools is None or self._remote is not None:
            return params
        from llcuda.structured.tool_calls import tool_constraint

        constraint = tool_constraint(tools, self._tool_format())
        if constraint is None:
            return params
        if params.structured is not None:
            raise ValueError(f"tool_choice {tools.choice!r} constrains the answer to a tool call: "
                             f"it cannot be combined with response_format, grammar or json_schema")
        return dataclasses.replace(params, structured=constraint)

    def _require_loaded(self) -> Any:
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("no model is loaded: call load_model(...) first")
        return loaded

    def _model_name(self) -> str:
        if self._remote is not None:
            return self._remote.model_name()
        return os.path.basename(self._model_path or "")

    def _encode_prompt(self, prompt: Any, name: str = "prompt") -> list[int]:
        _check_text(prompt, name)
        ids = self._require_loaded().tokenizer.encode(prompt, add_special=True, parse_special=True)
        return self._check_length(list(ids), name)

    def _encode_chat(self, messages: Any, tools: Any = None) -> list[int]:
        loaded = self._require_loaded()
        messages = _check_messages(messages)
        template = loaded.chat_template
        render_args: dict = {}
        if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            from llcuda.structured.tool_calls import chat_with_tools

            messages, render_args = chat_with_tools(getattr(template, "source", ""), messages,
                                                    tools)  # fmt: skip
        text = template.render(messages, add_generation_prompt=True, **render_args)
        # a template that writes <bos> itself must not get a second one from the tokenizer
        ids = loaded.tokenizer.encode(text, add_special=not template.adds_bos, parse_special=True)
        return self._check_length(list(ids), "messages")

    def _check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError("prompt must be a string or a non-empty list of token ids")
        if self._remote is not None:
            return _check_token_ids(ids, "prompt")
        vocab = self._require_loaded().model_config.vocab_size
        return self._check_length(_check_token_ids(ids, "prompt", vocab), "prompt")

    def _check_length(self, ids: list[int], name: str) -> list[int]:
        ctx = self._require_loaded().engine_config.ctx_size
        if len(ids) >= ctx:
            raise ValueError(
                f"{name} is {len(ids)} tokens but ctx_size is {ctx}: no room left to generate "
                f"(shorten it or load the model with a larger ctx_size)"
            )
        return ids

    def _openai_max_tokens(self, max_tokens: int | None, ids: list[int] | None) -> int:
        """llama-cpp-python: None or <= 0 means 'until the context is full'."""
        if max_tokens is None or (isinstance(max_tokens, int) and max_tokens <= 0):
            if self._remote is not None:  # the server knows the prompt's length; we may not
                return self._remote.ctx_size() or UNTIL_FULL
            return self._require_loaded().engine_config.ctx_size - len(ids or ())
        return max_tokens

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> TextStream:
        with self._lock:
            loaded = self._require_loaded()
            handle = self._loop.submit(prompt_ids, params)
        logprob_format = None
        if params.logprobs is not None:
            logprob_format = self._logprob_format(loaded)
        return TextStream(handle, len(prompt_ids), self._metrics, logprob_format)

    def _logprob_format(self, loaded: Any) -> Any:
        """The loaded model's TokenLogprobFormat, made on first use (it caches token texts);
        kept by its tokenizer, which pins no model memory after unload_model."""
        from llcuda.logprobs_format import TokenLogprobFormat

        cached = self._logprob_format_cache
        if cached is None or cached[0] is not loaded.tokenizer:
            cached = (loaded.tokenizer, TokenLogprobFormat(loaded.tokenizer))
            self._logprob_format_cache = cached
        return cached[1]


def _load_notices(loaded: Any) -> list[str]:
    """What a user would not otherwise see: the CPU path ignoring GPU knobs, a chat template
    that did not come from the file (or none at all)."""
    notices = []
    if str(loaded.device) == "cpu":
        config = loaded.engine_config
        why = (
            "device='cpu'" if config.device == "cpu"
            else "gpu_layers=0" if config.gpu_layers == 0
            else "no CUDA device"
        )  # fmt: skip
        from llcuda.kernels import quant_cpu_native  # here: importing llcuda needs no torch

        path = ("the C++ CPU kernels" if quant_cpu_native.enabled()
                and quant_cpu_native.load_native() is not None
                else "the pure-PyTorch reference path")  # fmt: skip
        notices.append(
            f"running on the CPU ({why}) through {path}: gpu_layers and flash_attn have no "
            f"effect here"
        )
    template = loaded.chat_template
    if not template.available:
        notices.append(f"chat is unavailable: {template.origin}")
    elif template.origin.startswith("builtin"):
        notices.append(
            f"chat template: {template.origin}; a file without one is often a base model, "
            f"not tuned to chat, whose chat answers may be poor"
        )
    return notices


def _sampling_params(max_tokens, temperature, top_k, top_p, seed, stop, extra) -> SamplingParams:
    extra = dict(extra)
    constraint = {name: extra.pop(name) for name in _CONSTRAINT_ARGS if name in extra}
    if constraint:
        from llcuda.structured.request_args import constraint_from_args

        extra["structured"] = constraint_from_args(**constraint)
    unknown = sorted(set(extra) - {*_EXTRA_SAMPLING_ARGS, "structured"})
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)}; "
            f"extra sampling arguments may be: "
            f"{', '.join(_EXTRA_SAMPLING_ARGS + _CONSTRAINT_ARGS)}"
        )
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop=stop, **extra,
    )  # fmt: skip


def _check_openai_logprobs(value: Any, name: str) -> None:
    """OpenAI's bound on alternatives per token (top_logprobs, legacy logprobs): 0-20."""
    from llcuda.logprobs_format import OPENAI_MAX_LOGPROBS

    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value <= OPENAI_MAX_LOGPROBS:
        raise ValueError(f"{name} must be in [0, {OPENAI_MAX_LOGPROBS}], got {value}")


def _chat_logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    """OpenAI chat's pair as SamplingParams.logprobs: None unless logprobs is true."""
    if logprobs is not None:
        _check_bool(logprobs, "logprobs")
    _check_openai_logprobs(top_logprobs, "top_logprobs")
    if not logprobs:
        if top_logprobs is not None:
            raise ValueError("top_logprobs needs logprobs=True")
        return None
    return top_logprobs or 0


def _constraint_args(response_format: Any, grammar: Any, json_schema: Any) -> dict:
    given = {"response_format": response_format, "grammar": grammar, "json_schema": json_schema}
    return {k: v for k, v in given.items() if v is not None}


def _pop_tools(kwargs: dict) -> Any:
    """The checked ToolSpec of kwargs' tools / tool_choice (removed from kwargs), or None."""
    tools, choice = kwargs.pop("tools", None), kwargs.pop("tool_choice", None)
    if tools is None and choice is None:
        return None
    from llcuda.structured.tool_calls import ToolSpec, check_tools

    if isinstance(tools, ToolSpec) and choice is None:  # checked already (the server's)
        return tools
    return check_tools(tools, choice)


def _local_only(params: SamplingParams, tools: Any = None) -> None:
    if params.structured is not None or tools is not None:
        raise ValueError("structured output and tools run on a local model only; with "
                         "server_url, send them to the server's OpenAI API")  # fmt: skip


def _with_structure(result: InferResult, params: SamplingParams, tools: Any = None,
                    fmt: str = "json") -> InferResult:  # fmt: skip
    """result with `parsed` (a complete JSON answer) and `tool_calls` filled in."""
    constraint = params.structured
    if constraint is not None and constraint.is_json and result.finish_reason == "stop":
        try:
            result.parsed = json.loads(result.text)
        except ValueError:
            pass  # a stop string cut it short: the text is what the model wrote
    if tools is not None and tools.choice != "none" and result.success:
        from llcuda.structured.tool_calls import parse_tool_calls

        _, calls = parse_tool_calls(result.text, fmt, tools.names)
        result.tool_calls = calls or None
    return result


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_text(text: Any, name: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    return text


def _check_token_ids(ids: Any, name: str, vocab_size: int | None = None) -> list[int]:
    """ids as a list; each must be an int in [0, vocab_size) (>= 0 when the vocab is remote)."""
    ids = list(ids)
    high = vocab_size if vocab_size is not None else float("inf")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < high:
            bound = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name}[{i}] must be a token id {bound}, got {t!r}")
    return ids


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {content!r}")
        checked.append({**m, "content": content})
    return checked
