"""InferenceEngine's contract (arguments, results, streams, chat, metrics) on a fake engine.

The loader is replaced by one that returns a scripted LLMEngine (one letter per step per request),
so these tests exercise the facade alone, fast and deterministically; the real model runs in
tests/models/test_api_real_model.py.
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field

import pytest

from llcuda import EngineConfig, InferenceEngine, InferResult, SamplingParams
from llcuda.config import ModelConfig
from llcuda.engine.llm_engine import RequestOutput

BOS = 2
FAIL_TEXT = "<explode>"


@dataclass
class FakeRequest:
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)


class FakeTokenizer:
    """One token per character (id = code point); BOS = 2 when add_special."""

    eog_ids = (1,)

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool]] = []

    def encode(self, text, add_special=True, parse_special=True):
        self.calls.append((text, add_special, parse_special))
        return ([BOS] if add_special else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != BOS)


class FakeTemplate:
    available = True
    name = "fake"
    origin = "the file's tokenizer.chat_template"

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def render(self, messages, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return body + ("<model>" if add_generation_prompt else "")


class FakeLLMEngine:
    """Generates 'a', 'b', 'c', ... one per step for every running request (LLMEngine's API)."""

    def __init__(self) -> None:
        self.requests: dict[str, FakeRequest] = {}
        self.pending: list[RequestOutput] = []  # abort records, reported by the next step
        self.aborted: list[str] = []
        self.max_running = 0
        self.steps = 0
        self.step_delay = 0.0  # seconds each step takes (lets other threads submit meanwhile)

    def check_request(self, prompt_token_ids, sampling_params):
        assert isinstance(sampling_params, SamplingParams)
        assert prompt_token_ids and all(isinstance(t, int) for t in prompt_token_ids)

    def add_request(self, prompt_token_ids, sampling_params, request_id):
        self.check_request(prompt_token_ids, sampling_params)
        self.requests[request_id] = FakeRequest(list(prompt_token_ids), sampling_params)

    def abort_request(self, request_id):
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.aborted.append(request_id)
        self.pending.append(
            RequestOutput(request_id, [], "", True, "abort", len(req.prompt), len(req.output))
        )
        return True

    def abort_all(self):
        ids = list(self.requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished_requests(self):
        return bool(self.requests) or bool(self.pending)

    def step(self):
        outputs, self.pending = self.pending, []
        if not self.requests:
            return outputs
        self.steps += 1
        time.sleep(self.step_delay)
        self.max_running = max(self.max_running, len(self.requests))
        for rid, req in list(self.requests.items()):
            if FakeTokenizer().decode(req.prompt).find(FAIL_TEXT) >= 0:
                raise RuntimeError("kernel exploded")
            token = ord("a") + len(req.output) % 26
            req.output.append(token)
            done = len(req.output) >= req.params.max_tokens
            outputs.append(
                RequestOutput(rid, [token], chr(token), done, "length" if done else None,
                           len(req.prompt), len(req.output))
            )  # fmt: skip
            if done:
                del self.requests[rid]
        return outputs


class FakeGGUF:
    file_size = 1234
    tensors = {"a": types.SimpleNamespace(n_elements=10), "b": types.SimpleNamespace(n_elements=5)}


class FakeLoaded:
    def __init__(self, config: EngineConfig, adds_bos: bool) -> None:
        self.llm_engine = FakeLLMEngine()
        self.tokenizer = FakeTokenizer()
        self.chat_template = FakeTemplate(adds_bos)
        self.model_config = ModelConfig(
            architecture="fake", name="Fake 1M", vocab_size=1000, hidden_size=8,
            intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
            rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=1e4,
            rope_theta_local=1e4,
        )  # fmt: skip
        self.engine_config = config
        self.device = "cpu"
        self.gguf = FakeGGUF()
        self.memory = {"weights": 100, "kv_cache": 50}
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def fake_loader(monkeypatch):
    module = types.ModuleType("llcuda.engine.loader")
    module.loads = []
    module.adds_bos = False

    def load(model_path, config, verbose=True, chat_template=None):
        loaded = FakeLoaded(config, module.adds_bos)
        module.loads.append((model_path, config, verbose, chat_template, loaded))
        return loaded

    module.load = load
    monkeypatch.setitem(sys.modules, "llcuda.engine.loader", module)
    return module


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    return path


@pytest.fixture
def engine(fake_loader, model_file):
    e = InferenceEngine()
    e.load_model(str(model_file), auto_start=False, verbose=False, ctx_size=64)
    yield e
    e.unload_model()


def fake_engine(e: InferenceEngine) -> FakeLLMEngine:
    return e._loaded.llm_engine


# --- before loading ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.infer("hi"),
        lambda e: e.infer_stream("hi"),
        lambda e: e.batch_infer(["hi"]),
        lambda e: e.chat([{"role": "user", "content": "hi"}]),
        lambda e: e.tokenize("hi"),
        lambda e: e.detokenize([1]),
        lambda e: e.create_completion("hi"),
        lambda e: e.model_info(),
        lambda e: e.memory_report(),
    ],
)
def test_calls_before_load_model_say_to_load(call):
    with pytest.raises(RuntimeError, match="load_model"):
        call(InferenceEngine())


def test_unloaded_state():
    e = InferenceEngine()
    assert not e.is_loaded
    e.unload_model()  # idempotent, even when nothing was loaded
    assert e.get_metrics()["latency"]["count"] == 0


# --- load_model arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ctx_size": 0}, "ctx_size"),
        ({"gpu_layers": -1}, "gpu_layers"),
        ({"batch_size": 0}, "batch_size"),
        ({"ubatch_size": 1024, "batch_size": 512}, "ubatch_size"),
        ({"n_parallel": 0}, "n_parallel"),
        ({"cache_size": 10}, "cache_size"),
        ({"flash_attn": "yes"}, "flash_attn"),
        ({"device": "tpu"}, "device"),
        ({"auto_start": "yes"}, "auto_start"),
        ({"verbose": 1}, "verbose"),
        ({"chat_template": 3}, "chat_template"),
        ({"n_gpu_layers": 10}, "n_gpu_layers"),
        ({"num_scheduler_steps": 0}, "num_scheduler_steps"),
    ],
)
def test_load_model_rejects_bad_arguments(kwargs, name, fake_loader, model_file):
    with pytest.raises(ValueError, match=name):
        InferenceEngine().load_model(str(model_file), **kwargs)
    assert fake_loader.loads == []  # validated before anything is loaded


def test_load_model_missing_file(fake_loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        InferenceEngine().load_model(str(tmp_path / "missing.gguf"))


def test_load_model_passes_config_and_template(fake_loader, model_file):
    e = InferenceEngine()
    assert e.load_model(
        model_file, ctx_size=256, batch_size=64, ubatch_size=32, n_parallel=3, gpu_layers=0,
        verbose=False, auto_start=False, chat_template="{{ x }}", block_size=16, device="cpu",
        num_scheduler_steps=4,
    )  # fmt: skip
    path, config, verbose, template, _ = fake_loader.loads[0]
    assert config.num_scheduler_steps == 4
    assert path == str(model_file.resolve())
    assert (config.ctx_size, config.batch_size, config.ubatch_size) == (256, 64, 32)
    assert (config.n_parallel, config.gpu_layers, config.block_size) == (3, 0, 16)
    assert config.device == "cpu"
    assert verbose is False
    assert template == "{{ x }}"
    assert e.is_loaded


def test_reload_unloads_previous(fake_loader, model_file):
    e = InferenceEngine()
    e.load_model(model_file, auto_start=False, verbose=False)
    first = fake_loader.loads[0][4]
    e.load_model(model_file, auto_start=False, verbose=False)
    assert first.closed
    e.unload_model()
    assert fake_loader.loads[1][4].closed


def test_context_manager_unloads(fake_loader, model_file):
    with InferenceEngine() as e:
        e.load_model(model_file, auto_start=False, verbose=False)
        loaded = fake_loader.loads[0][4]
        assert e.infer("x", max_tokens=2).success
    assert loaded.closed
    assert not e.is_loaded
    with pytest.raises(RuntimeError, match="load_model"):
        e.infer("x")
    e.unload_model()


# --- infer ------------------------------------------------------------------------------------


def test_infer_result(engine):
    result = engine.infer("hello", max_tokens=5, temperature=0.0)
    assert isinstance(result, InferResult)
    assert result.success and result.error_message is None
    assert result.text == "abcde"
    assert result.token_ids == [97, 98, 99, 100, 101]
    assert result.tokens_generated == 5
    assert result.prompt_tokens == 6  # BOS + 5 characters
    assert result.finish_reason == "length"
    assert 0 < result.ttft_ms <= result.latency_ms
    assert result.tokens_per_sec > 0
    text, add_special, parse_special = engine._loaded.tokenizer.calls[-1]
    assert (text, add_special, parse_special) == ("hello", True, True)


def test_infer_passes_sampling_params(engine):
    seen = []
    original = fake_engine(engine).add_request
    fake_engine(engine).add_request = lambda ids, p, request_id: (
        seen.append(p),
        original(ids, p, request_id),
    )
    engine.infer(
        "x", max_tokens=3, temperature=0.3, top_k=7, top_p=0.5, seed=11, stop="END",
        min_p=0.1, repeat_penalty=1.2, repeat_last_n=32, ignore_eos=True,
    )  # fmt: skip
    p = seen[0]
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (3, 0.3, 7, 0.5, 11)
    assert p.stop == ["END"]
    assert (p.min_p, p.repeat_penalty, p.repeat_last_n, p.ignore_eos) == (0.1, 1.2, 32, True)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_k": "40"}, "top_k"),
        ({"seed": "s"}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"min_p": 2.0}, "min_p"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repeat_penalty": float("nan")}, "repeat_penalty"),
        ({"repeat_last_n": 1.0}, "repeat_last_n"),
        ({"seed": True}, "seed"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_infer_rejects_bad_arguments(engine, kwargs, name):
    with pytest.raises(ValueError, match=name):
        engine.infer("hi", **kwargs)
    with pytest.raises(ValueError, match=name):
        engine.infer_stream("hi", **kwargs)
    assert fake_engine(engine).requests == {}


def test_prompt_must_be_text_and_fit(engine):
    with pytest.raises(ValueError, match="prompt"):
        engine.infer(["not", "text"])
    with pytest.raises(ValueError, match="ctx_size"):
        engine.infer("x" * 100)  # ctx_size=64


def test_engine_error_gives_failed_result(engine):
    result = engine.infer(FAIL_TEXT)
    assert not result.success
    assert "kernel exploded" in result.error_message
    assert result.finish_reason is None
    assert engine.get_metrics()["requests"]["failed"] == 1


# --- streams ----------------------------------------------------------------------------------


def test_stream_yields_pieces_then_result(engine):
    stream = engine.infer_stream("hi", max_tokens=4)
    pieces = list(stream)
    assert pieces == ["a", "b", "c", "d"]
    assert stream.result.text == "abcd"
    assert stream.result.finish_reason == "length"
    assert list(stream) == []  # exhausted streams stay exhausted


def test_closing_stream_early_aborts(engine):
    stream = engine.infer_stream("hi", max_tokens=50)
    assert next(stream) == "a"
    stream.close()
    assert stream.result.finish_reason == "abort"
    assert stream.result.tokens_generated == 1
    assert len(fake_engine(engine).aborted) == 1
    assert engine.get_metrics()["requests"]["in_flight"] == 0


def test_stream_engine_error_raises_and_records(engine):
    stream = engine.infer_stream(FAIL_TEXT)
    with pytest.raises(RuntimeError, match="exploded"):
        list(stream)
    assert stream.result.success is False


# --- batch ------------------------------------------------------------------------------------


def test_batch_infer_runs_concurrently_in_order(engine):
    results = engine.batch_infer(["one", "two", "three"], max_tokens=3)
    assert [r.text for r in results] == ["abc"] * 3
    assert [r.prompt_tokens for r in results] == [4, 4, 6]
    assert fake_engine(engine).max_running == 3  # all three shared the steps
    assert fake_engine(engine).steps == 3
    assert engine.get_metrics()["throughput"]["total_requests"] == 3


def test_batch_infer_arguments(engine):
    with pytest.raises(ValueError, match="list of strings"):
        engine.batch_infer("one prompt")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.batch_infer(["ok", 3])
    assert engine.batch_infer([]) == []


# --- chat -------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_chat_renders_template_and_handles_bos(fake_loader, model_file, adds_bos):
    fake_loader.adds_bos = adds_bos
    with InferenceEngine() as e:
        e.load_model(model_file, auto_start=False, verbose=False)
        result = e.chat(MESSAGES, max_tokens=2)
        text, add_special, parse_special = e._loaded.tokenizer.calls[-1]
        assert text == "<system>Be brief.<user>Hi<model>"
        assert add_special is (not adds_bos)
        assert parse_special is True
        assert result.text == "ab"
        assert "".join(e.chat_stream(MESSAGES, max_tokens=3)) == "abc"


@pytest.mark.parametrize(
    "messages",
    [[], "hi", [{"content": "no role"}], [{"role": "user", "content": 5}], ["user: hi"]],
)
def test_chat_rejects_bad_messages(engine, messages):
    with pytest.raises(ValueError, match="messages"):
        engine.chat(messages)


def test_chat_accepts_text_parts(engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert engine.chat(parts, max_tokens=1).success
    assert engine._loaded.tokenizer.calls[-1][0] == "<user>Hi<model>"


# --- tokens, metrics, info --------------------------------------------------------------------


def test_tokenize_detokenize(engine):
    assert engine.tokenize("ab") == [BOS, 97, 98]
    assert engine.tokenize("ab", add_special=False) == [97, 98]
    assert engine.detokenize([97, 98]) == "ab"
    with pytest.raises(ValueError, match="ids"):
        engine.detokenize([5000])
    with pytest.raises(ValueError, match="text"):
        engine.tokenize(None)


def test_metrics_and_reset(engine):
    engine.infer("a", max_tokens=4)
    engine.infer("b", max_tokens=2)
    snap = engine.get_metrics()
    assert snap["latency"]["count"] == 2
    assert snap["throughput"]["generated_tokens"] == 6
    assert snap["throughput"]["prompt_tokens"] == 4
    assert snap["throughput"]["tokens_per_sec"] > 0
    engine.reset_metrics()
    assert engine.get_metrics()["throughput"]["total_requests"] == 0


def test_model_info_and_memory(engine):
    info = engine.model_info()
    assert info["architecture"] == "fake"
    assert info["parameters"] == 15
    assert info["ctx_size"] == 64
    assert info["background_thread"] is False
    assert info["chat_template"] == "fake"
    assert info["chat_template_source"] == "the file's tokenizer.chat_template"
    mem = engine.memory_report()
    assert mem["weights"] == 100 and mem["kv_cache"] == 50 and mem["total"] == 150


# --- OpenAI-shaped results --------------------------------------------------------------------


def test_create_completion(engine):
    out = engine.create_completion("Hi", max_tokens=3)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert out["model"] == "fake.gguf"
    assert out["choices"][0]["text"] == "abc"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    echoed = engine.create_completion("Hi", max_tokens=1, echo=True)
    assert echoed["choices"][0]["text"] == "Hia"
    from_ids = engine.create_completion([BOS, 72], max_tokens=2)
    assert from_ids["usage"]["prompt_tokens"] == 2


def test_create_completion_until_context_full(engine):
    out = engine.create_completion("Hi", max_tokens=None)
    assert out["usage"]["completion_tokens"] == 64 - 3


def test_create_completion_stream(engine):
    chunks = list(engine.create_completion("Hi", max_tokens=2, stream=True))
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


def test_create_chat_completion(engine):
    out = engine.create_chat_completion(MESSAGES, max_tokens=2)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert out["usage"]["completion_tokens"] == 2
    chunks = list(engine.create_chat_completion(MESSAGES, max_tokens=2, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == ["a", "b"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["object"] == "chat.completion.chunk"


def test_create_completion_engine_error_raises(engine):
    with pytest.raises(RuntimeError, match="exploded"):
        engine.create_completion(FAIL_TEXT)


# --- background thread ------------------------------------------------------------------------


def test_background_thread_serves_requests(fake_loader, model_file):
    with InferenceEngine() as e:
        e.load_model(model_file, verbose=False, n_parallel=4)
        assert e.model_info()["background_thread"] is True
        assert e.infer("hi", max_tokens=3).text == "abc"
        fake_engine(e).step_delay = 0.01  # the four submissions land while step 1 runs
        results = e.batch_infer(["a", "b", "c", "d"], max_tokens=5)
        assert [r.text for r in results] == ["abcde"] * 4
        assert fake_engine(e).max_running >= 2
        assert "".join(e.infer_stream("x", max_tokens=2)) == "ab"


def test_calling_thread_mode_reports_a_dropped_request(engine):
    stream = engine.infer_stream("hi", max_tokens=5)
    assert next(stream) == "a"
    fake_engine(engine).requests.clear()  # the engine loses it without a final output
    result = stream.consume()
    assert not result.success
    assert "stuck" in result.error_message


def test_kept_streams_do_not_pin_the_engine_after_unload(fake_loader, model_file):
    import gc
    import weakref

    e = InferenceEngine()
    e.load_model(model_file, verbose=False, auto_start=False)
    finished = e.infer_stream("hi", max_tokens=2)
    assert list(finished) == ["a", "b"]
    closed = e.infer_stream("hi", max_tokens=9)
    next(closed)
    closed.close()
    loop = weakref.ref(e._loop)
    e.unload_model()
    gc.collect()
    assert loop() is None  # the streams above are still alive, the engine loop is not
    assert finished.result.text == "ab" and closed.result.finish_reason == "abort"


def test_load_model_prefix_caching_knob(fake_loader, model_file):
    e = InferenceEngine()
    e.load_model(model_file, verbose=False, auto_start=False)
    assert fake_loader.loads[-1][1].enable_prefix_caching is True  # on by default
    e.load_model(model_file, verbose=False, auto_start=False, enable_prefix_caching=False)
    assert fake_loader.loads[-1][1].enable_prefix_caching is False
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        e.load_model(model_file, verbose=False, enable_prefix_caching="no")
    e.unload_model()


# --- honest defaults: effective knobs, load notices, automatic n_parallel -----------------------


def test_model_info_reports_effective_knobs_on_the_cpu(fake_loader, model_file, capsys):
    with InferenceEngine() as e:
        e.load_model(model_file, auto_start=False, gpu_layers=99, flash_attn=True, verbose=True)
        info = e.model_info()
        assert info["device"] == "cpu"
        assert info["gpu_layers"] == 0 and info["flash_attn"] is False
        err = capsys.readouterr().err
        assert err.count("running on the CPU") == 1
        assert "gpu_layers and flash_attn have no effect" in err
        e.load_model(model_file, auto_start=False, verbose=False)
        assert capsys.readouterr().err == ""  # verbose=False: silent


def test_model_info_counts_layers_on_the_gpu(fake_loader, model_file):
    with InferenceEngine() as e:
        e.load_model(model_file, auto_start=False, verbose=False, gpu_layers=99)
        e._loaded.device = "cuda:0"  # the fake model has 2 blocks: 2 + the head at most
        assert e.model_info()["gpu_layers"] == 3
        e.load_model(model_file, auto_start=False, verbose=False, gpu_layers=1)
        e._loaded.device = "cuda:0"
        assert e.model_info()["gpu_layers"] == 1


def test_builtin_or_missing_chat_template_is_announced(fake_loader, model_file, capsys):
    from llcuda.gguf.chat_template import UnavailableChatTemplate, chat_template_from_metadata

    with InferenceEngine() as e:
        e.load_model(model_file, auto_start=False, verbose=False)
        e._loaded.chat_template = UnavailableChatTemplate("no template for 'mamba'")
        assert e.model_info()["chat_template"] is None
        assert e.model_info()["chat_template_source"] == "no template for 'mamba'"
        with pytest.raises(ValueError, match="cannot chat: no template for 'mamba'"):
            e.chat(MESSAGES)
        with pytest.raises(ValueError, match="cannot chat"):
            e.create_chat_completion(MESSAGES)
        assert e.infer("hi", max_tokens=2).text == "ab"  # completions still work

    from llcuda.api import _load_notices

    loaded = FakeLoaded(EngineConfig(), adds_bos=False)
    md = {"general.architecture": "gemma3", "tokenizer.ggml.tokens": ["<start_of_turn>",
                                                                      "<end_of_turn>"]}
    loaded.chat_template = chat_template_from_metadata(md)
    notices = _load_notices(loaded)
    assert any("builtin 'gemma'" in n and "base model" in n for n in notices)
    loaded.chat_template = UnavailableChatTemplate("why")
    assert "chat is unavailable: why" in _load_notices(loaded)


def test_n_parallel_is_automatic_by_default(fake_loader, model_file):
    e = InferenceEngine()
    e.load_model(model_file, auto_start=False, verbose=False, ctx_size=256)
    config = fake_loader.loads[-1][1]
    assert (config.n_parallel, config.n_parallel_auto) == (4, True)
    assert config.num_cache_tokens == 256  # one unified pool: no more KV than one context
    info = e.model_info()
    assert (info["n_parallel"], info["n_parallel_auto"], info["cache_size"]) == (4, True, 256)
    e.load_model(model_file, auto_start=False, verbose=False, ctx_size=256, n_parallel=-1,
                 cache_size=1024)  # fmt: skip
    config = fake_loader.loads[-1][1]
    assert (config.n_parallel, config.num_cache_tokens) == (4, 1024)
    e.load_model(model_file, auto_start=False, verbose=False, ctx_size=256, n_parallel=2)
    config = fake_loader.loads[-1][1]
    assert (config.n_parallel, config.n_parallel_auto, config.num_cache_tokens) == (2, False, 512)
    with pytest.raises(ValueError, match="n_parallel must be >= 1, or None / -1"):
        e.load_model(model_file, verbose=False, n_parallel=-2)
    with pytest.raises(ValueError, match="n_parallel"):
        e.load_model(model_file, verbose=False, n_parallel="auto")
    e.unload_model()


def test_openai_and_token_flags_must_be_bools(engine):
    with pytest.raises(ValueError, match="stream"):
        engine.create_completion("Hi", stream="yes")
    with pytest.raises(ValueError, match="echo"):
        engine.create_completion("Hi", echo=1)
    with pytest.raises(ValueError, match="stream"):
        engine.create_chat_completion(MESSAGES, stream=0)
    with pytest.raises(ValueError, match="add_special"):
        engine.tokenize("hi", add_special="no")
    with pytest.raises(ValueError, match="parse_special"):
        engine.tokenize("hi", parse_special=None)
    assert fake_engine(engine).requests == {}


def test_tokens_per_sec_is_the_request_s_own_decode_speed(engine):
    fake = fake_engine(engine)
    original_step = fake.step

    def step():  # the first token waits 150 ms (a queue, a long prefill), then 10 ms a token
        fake.step_delay = 0.15 if fake.steps == 0 else 0.01
        return original_step()

    fake.step = step
    result = engine.infer("hi", max_tokens=5)
    assert result.ttft_ms >= 150
    # 4 tokens after the first over the ~40 ms from first to last: ~100 tok/s (counting the
    # wait, 5 tokens over ~190 ms, it would read ~26)
    decode_s = (result.latency_ms - result.ttft_ms) / 1000
    assert result.tokens_per_sec == pytest.approx(4 / decode_s, rel=0.2)
    assert result.tokens_per_sec > 2 * 5 / (result.latency_ms / 1000)
    assert engine.infer("hi", max_tokens=1).tokens_per_sec == 0.0  # no decode step at all
