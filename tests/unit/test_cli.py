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
    assert "architecture:     llama" in out
    assert "Tiny Test" in out
    assert "F16 (1)" in out
    assert "context length:   512" in out
    assert "layers:           2" in out
    assert "heads:            2 (kv heads 1)" in out
    assert "gpt2 (vocab 4)" in out
    assert "chat template:    yes" in out
    assert "parameters:       0.0 M (104)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line}
    assert lines["F16"][1:3] == ["2", "192"]  # 2 tensors, (32 + 64) * 2 bytes
    assert lines["F32"][1:3] == ["1", "32"]
    assert lines["total"][1:3] == ["3", "224"]


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
    assert load == ("load", "m.gguf", {"gpu_layers": 0, "ctx_size": 512, "verbose": True,
                                      "device": "cpu"})  # fmt: skip
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
