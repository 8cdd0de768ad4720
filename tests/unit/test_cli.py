"""The `llcuda` command: parsing, `info` on small GGUF files written here, `generate` wiring."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

from llcuda import cli
from llcuda.hub import EMBEDDED_MODEL
from llcuda.streams import InferResult


@pytest.fixture
def tiny_gguf(tmp_path):
    """A small but real GGUF file: llama-style metadata, F32 and F16 tensors, a chat template."""
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("Tiny Test")
    w.add_context_length(512)
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_file_type(1)  # MOSTLY_F16
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_parser_requires_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_generate_defaults():
    args = cli.build_parser().parse_args(["generate", "hello"])
    assert args.prompt == "hello"
    assert args.model == EMBEDDED_MODEL
    assert (args.max_tokens, args.temp, args.top_k, args.top_p) == (128, 0.8, 40, 0.95)
    assert (args.seed, args.ctx_size, args.gpu_layers, args.chat) == (None, 2048, 99, False)


def test_generate_options():
    args = cli.build_parser().parse_args(
        "generate hi -m x.gguf -n 7 --temp 0 --top-k 3 --top-p 0.5 --seed 9 -c 256 -ngl 0 "
        "--chat --stop END --stop STOP -q".split()
    )
    assert (args.model, args.max_tokens, args.temp, args.top_k, args.top_p) == (
        "x.gguf", 7, 0.0, 3, 0.5,
    )  # fmt: skip
    assert (args.seed, args.ctx_size, args.gpu_layers, args.chat, args.quiet) == (
        9, 256, 0, True, True,
    )  # fmt: skip
    assert args.stop == ["END", "STOP"]


def test_generate_rejects_non_numbers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "-n", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_info(tiny_gguf, capsys):
    assert cli.main(["info", str(tiny_gguf)]) == 0
    out = capsys.readouterr().out
    from llcuda.models.registry import MODELS

    assert "architecture:     llama (" in out
    if "llama" not in MODELS:
        assert "not supported yet" in out and "it runs: gemma3" in out
    assert "head dim:         4" in out  # no attention.key_length: n_embd / n_head
    assert "Tiny Test" in out
    assert "F16 (1)" in out
    assert "context length:   512" in out
    assert "layers:           2" in out
    assert "heads:            2 (kv heads 1)" in out
    assert "gpt2 (vocab 4)" in out
    assert "chat template:    yes" in out
    assert lines_with(out, "F16")[-1] == "yes"  # the supported column
    assert "parameters:       0.0 M (104)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line}
    assert lines["F16"][1:3] == ["2", "192"]  # 2 tensors, (32 + 64) * 2 bytes
    assert lines["F32"][1:3] == ["1", "32"]
    assert lines["total"][1:3] == ["3", "224"]


def lines_with(out: str, first: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(first + " "))


def _write(path, arch: str, tensors: dict, tokens=("a", "b")) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_token_list(list(tokens))
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_info_names_what_llcuda_cannot_run(tmp_path, capsys):
    from gguf import GGMLQuantizationType

    path = tmp_path / "mamba.gguf"
    # one NVFP4 block (36 bytes for 64 weights): a type the reference path cannot compute
    nvfp4 = np.zeros((1, 36), dtype=np.uint8)
    _write(path, "mamba", {"blk.0.ssm_x.weight": (nvfp4, GGMLQuantizationType.NVFP4),
                           "output_norm.weight": (np.ones(8, dtype=np.float32), None)})
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture:     mamba (not supported: llcuda does not know" in out
    assert lines_with(out, "NVFP4")[-1] == "no" and lines_with(out, "F32")[-1] == "yes"
    assert "cannot compute tensor type(s) NVFP4" in out
    assert "chat template:    no; chat is refused" in out
    assert "head dim:         4" in out


def test_info_supported_architecture(tmp_path, capsys):
    path = tmp_path / "g.gguf"
    _write(path, "gemma3", {"output_norm.weight": (np.ones(8, dtype=np.float32), None)},
           tokens=("<start_of_turn>", "<end_of_turn>"))  # fmt: skip
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gemma3 (supported: llcuda runs it with DecoderForCausalLM)" in out
    assert "chat template:    no; chat uses the builtin 'gemma'" in out
    assert "cannot compute" not in out


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not a GGUF file"), (b"NOPE" * 10, "not a GGUF file"), (b"GGUF\x03\x00\x00\x00", "")],
)
def test_info_bad_file_is_one_line_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert cli.main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llcuda: error: ")
    assert message.lower() in err.lower()
    assert "Traceback" not in err


def test_info_missing_file(capsys):
    assert cli.main(["info", "/nonexistent/model.gguf"]) == 1
    assert "model file not found: /nonexistent/model.gguf" in capsys.readouterr().err


def test_info_unknown_name_lists_models(capsys):
    assert cli.main(["info", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert EMBEDDED_MODEL in err


class FakeStream:
    def __init__(self, pieces):
        self._pieces = iter(pieces)
        self.result = None
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._pieces)
        except StopIteration:
            self.result = InferResult(
                success=True, text="Hello world", tokens_generated=5, prompt_tokens=4,
                latency_ms=600.0, ttft_ms=100.0, finish_reason="length",
            )  # fmt: skip
            raise

    def close(self):
        self.closed = True


class FakeEngine:
    instances: list = []

    def __init__(self):
        self.calls = []
        FakeEngine.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.calls.append(("unload",))

    def load_model(self, model, **kwargs):
        self.calls.append(("load", model, kwargs))

    def infer_stream(self, prompt, **kwargs):
        self.calls.append(("infer_stream", prompt, kwargs))
        return FakeStream(["Hello", " world"])

    def chat_stream(self, messages, **kwargs):
        self.calls.append(("chat_stream", messages, kwargs))
        return FakeStream(["Hi"])

    def model_info(self):
        return {"load_time_s": 1.5}


@pytest.fixture
def fake_engine(monkeypatch):
    import llcuda.api

    FakeEngine.instances = []
    monkeypatch.setattr(llcuda.api, "InferenceEngine", FakeEngine)
    return FakeEngine


def test_generate_streams_and_reports(fake_engine, capsys):
    argv = "generate Say -m m.gguf -n 5 --temp 0 --seed 3 -c 512 -ngl 0 --device cpu".split()
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "Hello world\n"
    engine = fake_engine.instances[0]
    load, infer, unload = engine.calls
    assert load == ("load", "m.gguf", {"gpu_layers": 0, "ctx_size": 512, "n_parallel": 1,
                                      "verbose": True, "device": "cpu"})  # fmt: skip
    assert infer[1] == "Say"
    assert infer[2]["max_tokens"] == 5 and infer[2]["temperature"] == 0.0
    assert infer[2]["seed"] == 3
    assert unload == ("unload",)
    # prompt eval: 4 tokens in the 100 ms to the first token; eval: 4 runs in the other 500 ms
    assert "load time =    1500.00 ms" in err
    assert "prompt eval time =     100.00 ms /     4 tokens" in err
    assert "40.00 tokens per second" in err
    assert "eval time =     500.00 ms /     4 runs" in err
    assert "8.00 tokens per second" in err
    assert "total time =     600.00 ms /     9 tokens" in err


def test_generate_chat_quiet(fake_engine, capsys):
    assert cli.main(["generate", "Hello?", "--chat", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi\n"
    assert err == ""
    engine = fake_engine.instances[0]
    assert engine.calls[0][1] == EMBEDDED_MODEL
    assert engine.calls[0][2]["verbose"] is False
    assert engine.calls[1][:2] == ("chat_stream", [{"role": "user", "content": "Hello?"}])


def test_generate_error_is_one_line(fake_engine, capsys, monkeypatch):
    def broken(self, model, **kwargs):
        raise ValueError("ctx_size must be >= 8, got 1")

    monkeypatch.setattr(FakeEngine, "load_model", broken)
    assert cli.main(["generate", "x", "-c", "1"]) == 1
    assert capsys.readouterr().err == "llcuda: error: ctx_size must be >= 8, got 1\n"


def test_broken_pipe_is_quiet():
    # in a child process: the handler points fd 1 at /dev/null, which pytest's capture must not see
    code = (
        "import sys\n"
        "from llcuda import cli\n"
        "def closed_reader(args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli._info = closed_reader\n"
        "sys.exit(cli.main(['info', 'whatever']))\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == 1
    assert child.stderr == ""


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_prefix_caching_flags(command):
    parse = cli.build_parser().parse_args
    prompt = ["hi"] if command == "generate" else []
    assert parse([command, *prompt]).prefix_caching is True
    for flag in ("--no-prefix-caching", "--no-enable-prefix-caching"):  # ours, vLLM's
        assert parse([command, *prompt, flag]).prefix_caching is False
    assert parse([command, *prompt, "--enable-prefix-caching"]).prefix_caching is True


def test_serve_num_scheduler_steps_flag():
    parse = cli.build_parser().parse_args
    assert cli._engine_extra(parse(["serve"])) == {}  # the engine's default (16 on a GPU)
    args = parse(["serve", "--num-scheduler-steps", "1"])
    assert cli._engine_extra(args) == {"num_scheduler_steps": 1}


def test_generate_no_prefix_caching_reaches_load_model(fake_engine):
    assert cli.main(["generate", "x", "-q", "--no-prefix-caching"]) == 0
    assert fake_engine.instances[0].calls[0][2]["enable_prefix_caching"] is False
    assert cli.main(["generate", "x", "-q"]) == 0  # the default is load_model's own (on)
    assert "enable_prefix_caching" not in fake_engine.instances[1].calls[0][2]


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["generate", "--help"], ["(default: 128)", "(default: 0.8)", "(default: 2048)",
                                  "(default: 99)", "(default: 40)", "(default: 0.95)"]),
        (["serve", "--help"], ["(default: 8080)", "(default: -1)", "(default: 2048)",
                               "(default: 512)", "(default: 127.0.0.1)"]),
        (["bench", "--help"], ["(default: 512)", "(default: 128)", "(default: 3)"]),
    ],
)  # fmt: skip
def test_help_lists_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        cli.main(command)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shown:
        assert text in out
    assert "(default: False)" not in out and "(default: None)" not in out


def test_one_temperature_default_everywhere():
    import inspect

    from llcuda import InferenceEngine, SamplingParams
    from llcuda.sampling_params import DEFAULT_TEMPERATURE

    assert DEFAULT_TEMPERATURE == 0.8  # llama.cpp's
    assert cli.build_parser().parse_args(["generate", "x"]).temp == DEFAULT_TEMPERATURE
    assert SamplingParams().temperature == DEFAULT_TEMPERATURE
    for method in ("infer", "infer_stream", "batch_infer", "chat", "chat_stream"):
        default = inspect.signature(getattr(InferenceEngine, method)).parameters["temperature"]
        assert default.default == DEFAULT_TEMPERATURE, method


def test_api_key_default_is_not_printed(monkeypatch, capsys):
    monkeypatch.setenv("LLCUDA_API_KEY", "s3cret")
    assert cli.build_parser().parse_args(["serve"]).api_key is None  # read in _serve instead
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "s3cret" not in capsys.readouterr().out


class FakeServeEngine(FakeEngine):
    def model_info(self):
        return {
            "name": "Tiny", "path": "/m/tiny.gguf", "architecture": "gemma3", "device": "cpu",
            "gpu_layers": 0, "num_layers": 4, "ctx_size": 2048, "context_length": 32768,
            "n_parallel": 4, "n_parallel_auto": True, "cache_size": 2048,
            "chat_template": "gemma", "chat_template_source": "builtin",
        }  # fmt: skip

    def memory_report(self):
        return {"kv_cache": 3 * 2**20}


def test_serve_prints_a_summary_and_passes_auto_n_parallel(monkeypatch, capsys):
    import llcuda.api
    import llcuda.server.app

    served = []
    FakeEngine.instances = []
    monkeypatch.setattr(llcuda.api, "InferenceEngine", FakeServeEngine)
    monkeypatch.setattr(llcuda.server.app, "serve",
                        lambda engine, host, port, api_key, model_name: served.append(
                            (host, port, api_key)) or 0)  # fmt: skip
    monkeypatch.setenv("LLCUDA_API_KEY", "k")
    assert cli.main(["serve", "m.gguf", "--port", "9000"]) == 0
    load = FakeEngine.instances[0].calls[0]
    assert load[2]["n_parallel"] == -1  # automatic, resolved by EngineConfig
    assert served == [("127.0.0.1", 9000, "k")]
    err = capsys.readouterr().err
    for text in ("model:         Tiny (/m/tiny.gguf)", "architecture:  gemma3",
                 "device:        cpu (gpu layers 0/5)", "context:       2048 tokens per sequence",
                 "slots:         4 sequences decoded together (-np auto)",
                 "kv cache:      2,048 tokens, one pool shared",
                 "3.0 MiB", "listening:     http://127.0.0.1:9000", "api key:       on"):
        assert text in err, text
    monkeypatch.delenv("LLCUDA_API_KEY")
    assert cli.main(["serve", "m.gguf", "-np", "2", "-q"]) == 0
    assert FakeEngine.instances[1].calls[0][2]["n_parallel"] == 2
    assert served[-1][2] is None
    assert capsys.readouterr().err == ""  # -q: no summary


def test_serve_summary_for_explicit_slots():
    info = FakeServeEngine().model_info() | {"n_parallel": 2, "n_parallel_auto": False,
                                             "cache_size": 4096, "chat_template": None,
                                             "chat_template_source": "no template"}
    text = cli.serve_summary(info, {"kv_cache": 0}, "0.0.0.0", 80, api_key=False)
    assert "(-np 2)" in text and "4,096 tokens, 2 x 2048" in text
    assert "chat template: none: no template" in text
    assert "api key:       off" in text


def test_info_on_wrongly_typed_tokens_is_no_traceback(tmp_path, capsys):
    """`llcuda info` describes what it can of a file whose tokenizer.ggml.tokens is no array."""
    path = tmp_path / "bad.gguf"
    w = GGUFWriter(path, "llama")
    w.add_uint32("tokenizer.ggml.tokens", 7)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli.main(["info", str(path)]) == 0
    assert "(vocab ?)" in capsys.readouterr().out


def test_generate_grammar_file_and_json_schema_reach_infer(fake_engine, tmp_path):
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    assert cli.main(["generate", "x", "-q", "--grammar-file", str(grammar)]) == 0
    assert fake_engine.instances[0].calls[1][2]["grammar"] == 'root ::= "yes" | "no"\n'
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    assert cli.main(["generate", "x", "-q", "--json-schema", str(schema)]) == 0
    assert fake_engine.instances[1].calls[1][2]["json_schema"] == '{"type": "object"}'
    assert cli.main(["generate", "x", "-q", "--json-schema", '{"type": "string"}']) == 0


def test_generate_bad_grammar_fails_before_loading(fake_engine, tmp_path, capsys):
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= nothing\n")
    assert cli.main(["generate", "x", "--grammar-file", str(bad)]) == 1
    assert "Rule 'nothing' not found" in capsys.readouterr().err
    assert fake_engine.instances == []  # no engine made, nothing loaded
    assert cli.main(["generate", "x", "--json-schema", str(tmp_path / "missing.json")]) == 1
    assert "--json-schema: cannot read" in capsys.readouterr().err
