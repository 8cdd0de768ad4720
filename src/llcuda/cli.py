"""The `llcuda` command: `generate` text from a prompt, `info` about a GGUF file, `bench` speed.

Each subcommand is one `_add_<name>(subparsers)` function that registers its arguments and
sets `func`; `bench` and `serve` join the same way. Expected failures (a bad file, a bad
argument, no network) print `llcuda: error: ...` and exit 1; set LLCUDA_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from llcuda import __version__
from llcuda.config import AUTO_N_PARALLEL
from llcuda.hub import EMBEDDED_MODEL, resolve_model
from llcuda.sampling_params import DEFAULT_TEMPERATURE


class _HelpFormat(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, as llama.cpp's does; not for on/off flags (their
    help says what they change) nor for a None default (the help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llcuda", description="Run GGUF language models on NVIDIA GPUs (or the CPU).",
        formatter_class=_HelpFormat,
    )
    parser.add_argument("--version", action="version", version=f"llcuda {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_info, _add_bench, _add_serve):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`llcuda generate ... | head`): stop quietly, and point
        # stdout at /dev/null so that the interpreter's final flush does not complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        # FileNotFoundError, GGUFError (a ValueError), ModelNotFoundError, CUDA unavailable, ...
        if os.environ.get("LLCUDA_DEBUG"):
            raise
        print(f"llcuda: error: {exc}", file=sys.stderr)
        return 1


# --- generate -------------------------------------------------------------------------------


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of PROMPT to stdout",
        description="Stream a completion of PROMPT to stdout; timings go to stderr at the end.",
        formatter_class=_HelpFormat,
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL,
                   help="a .gguf path, a known name or owner/repo:file.gguf (the default is "
                        "shipped on PyPI)")  # fmt: skip
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMPERATURE,
                   help="temperature (llama.cpp's default); 0 is greedy")  # fmt: skip
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling; 0 disables it")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling; 1.0 disables it")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling; 0.0 disables it")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 is off")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size in tokens")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=99,
                   help="layers on the GPU (no effect on the CPU)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")  # fmt: skip
    _add_threads(p)
    _add_prefix_caching(p)
    _add_tensor_parallel(p)
    p.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the model's chat template (the file's, "
        "else the architecture's builtin; a model with neither refuses)",
    )
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar, no notices, no timings")  # fmt: skip
    _add_constraint(p)
    p.set_defaults(func=_generate)


def _add_constraint(p: argparse.ArgumentParser) -> None:
    """llama-cli's output constraints (llcuda.structured): one of them."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--grammar", default=None, metavar="GBNF",
                       help="constrain the output to this GBNF grammar")  # fmt: skip
    group.add_argument("--grammar-file", default=None, metavar="FILE",
                       help="constrain the output to the GBNF grammar in FILE")  # fmt: skip
    group.add_argument("--json-schema", "-j", default=None, metavar="SCHEMA_OR_FILE",
                       help="constrain the output to JSON matching this schema (inline JSON, "
                       "or a file holding it)")  # fmt: skip


def _constraint_args(args: argparse.Namespace) -> dict:
    """The constraint as infer keyword arguments, checked before the model loads."""
    grammar, schema = args.grammar, args.json_schema
    if args.grammar_file is not None:
        grammar = _read_text(args.grammar_file, "--grammar-file")
    if schema is not None and not schema.lstrip().startswith("{"):
        schema = _read_text(schema, "--json-schema")
    given = {k: v for k, v in (("grammar", grammar), ("json_schema", schema)) if v is not None}
    if given:
        from llcuda.structured.request_args import constraint_from_args

        constraint_from_args(**given)  # a ValueError now, before a minute of loading
    return given


def _read_text(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{option}: cannot read {path!r}: {exc}") from None


def _generate(args: argparse.Namespace) -> int:
    from llcuda.api import InferenceEngine

    verbose = not args.quiet
    extra = _engine_extra(args)
    constraint = _constraint_args(args)
    with InferenceEngine() as engine:
        # one request: one slot (an automatic n_parallel would only capture more CUDA graphs)
        engine.load_model(args.model, gpu_layers=args.gpu_layers, ctx_size=args.ctx_size,
                          n_parallel=1, verbose=verbose, **extra)  # fmt: skip
        sampling = dict(
            max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, stop=args.stop, min_p=args.min_p,
            repeat_penalty=args.repeat_penalty, **constraint,
        )  # fmt: skip
        if args.chat:
            stream = engine.chat_stream([{"role": "user", "content": args.prompt}], **sampling)
        else:
            stream = engine.infer_stream(args.prompt, **sampling)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            stream.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            print(_perf_report(stream.result, engine.model_info()["load_time_s"]), file=sys.stderr)
    return 0


def _add_prefix_caching(p: argparse.ArgumentParser) -> None:
    """On by default; --no-prefix-caching (or vLLM's --no-enable-prefix-caching) turns it off.
    Also --swa-full, the other switch of what the KV cache keeps."""
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="prefix_caching",
                   action="store_false",
                   help="compute every prompt in full instead of reusing the KV blocks of a "
                        "prefix seen before (prefix caching is on by default)")  # fmt: skip
    # vLLM's spelling of the default
    p.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.set_defaults(prefix_caching=True)
    p.add_argument("--swa-full", action="store_true",
                   help="keep the sliding-window layers' KV cache at full size (llama.cpp's "
                        "--swa-full); by default they keep what their window sees")  # fmt: skip


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads (llama.cpp's -t; default: one per physical core)")  # fmt: skip


def _add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split every layer over N processes (one per GPU, cuda:0..N-1; gloo on "
                        "the CPU), as vLLM's -tp")  # fmt: skip


def _add_scheduler_steps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-scheduler-steps", type=int, default=None, metavar="N",
                   help="decode steps chained on the GPU per scheduling round (vLLM's "
                        "multi-step scheduling; default: 16 on a GPU, 1 on the CPU; 1 streams "
                        "every token as it is sampled)")  # fmt: skip


def _engine_extra(args: argparse.Namespace) -> dict:
    """load_model keyword arguments that are only passed when they differ from its defaults."""
    extra: dict = {"device": args.device} if args.device else {}
    if not args.prefix_caching:
        extra["enable_prefix_caching"] = False
    if getattr(args, "swa_full", False):
        extra["swa_full"] = True
    if getattr(args, "num_scheduler_steps", None) is not None:
        extra["num_scheduler_steps"] = args.num_scheduler_steps
    if getattr(args, "tensor_parallel_size", 1) != 1:
        extra["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "threads", None) is not None:
        extra["n_threads"] = args.threads
    return extra


def _perf_report(result, load_time_s: float) -> str:
    """llama.cpp's llama_perf_context_print lines.

    prompt eval = submission to first token (prefill and the first sample); eval = the remaining
    tokens, one decode step ("run") each.
    """
    n_prompt, n_gen = result.prompt_tokens, result.tokens_generated
    prompt_ms = result.ttft_ms if n_gen else result.latency_ms
    eval_ms = max(result.latency_ms - prompt_ms, 0.0)
    runs = max(n_gen - 1, 0)

    def rate(ms: float, n: int, unit: str) -> str:
        per = ms / n if n else 0.0
        tps = 1000.0 * n / ms if ms > 0 else 0.0
        return (
            f"{ms:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, {tps:8.2f} tokens per second)"
        )

    return "\n".join([
        f"llcuda:        load time = {load_time_s * 1000:10.2f} ms",
        f"llcuda: prompt eval time = {rate(prompt_ms, n_prompt, 'tokens')}",
        f"llcuda:        eval time = {rate(eval_ms, runs, 'runs  ')}",
        f"llcuda:       total time = {result.latency_ms:10.2f} ms / {n_prompt + n_gen:5d} tokens",
    ])  # fmt: skip


# --- info -----------------------------------------------------------------------------------


def _add_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a GGUF file: architecture, size, shape, tokenizer, tensor types",
        description="Describe a GGUF file without loading its weights: what it is, and "
        "whether llcuda can run its architecture and tensor types.",
        formatter_class=_HelpFormat,
    )
    p.add_argument("model", metavar="FILE_OR_NAME", help="a .gguf path or a known model name")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from llcuda.gguf.reader import GGUFFile

    path = resolve_model(args.model, verbose=True)
    with GGUFFile(path) as gguf:
        print(describe_gguf(gguf))
    return 0


def describe_gguf(gguf) -> str:
    """A human-readable summary of a GGUF file's metadata and tensors."""
    md = gguf.metadata
    arch = md.get("general.architecture", "?")

    def key(name: str, default: object = "?") -> object:
        return md.get(f"{arch}.{name}", default)

    tensors = list(gguf.tensors.values())
    n_params = sum(t.n_elements for t in tensors)
    heads, kv_heads = key("attention.head_count"), key("attention.head_count_kv", None)
    tokens = md.get("tokenizer.ggml.tokens")
    rows = [
        ("file", f"{gguf.path} ({_size(gguf.file_size)})"),
        ("architecture", f"{arch} ({_architecture_support(arch)})"),
        ("name", md.get("general.name", "?")),
        ("file type", _file_type(md.get("general.file_type"))),
        ("parameters", f"{n_params / 1e6:.1f} M ({n_params:,})"),
        ("context length", key("context_length")),
        ("layers", key("block_count")),
        ("embedding dim", key("embedding_length")),
        ("feed-forward dim", key("feed_forward_length")),
        ("heads", f"{heads} (kv heads {kv_heads if kv_heads is not None else heads})"),
        ("head dim", key("attention.key_length", _head_dim(key("embedding_length"), heads))),
        (
            "tokenizer",
            f"{md.get('tokenizer.ggml.model', '?')} "
            f"(vocab {len(tokens) if isinstance(tokens, list) else '?'})",
        ),  # fmt: skip
        ("chat template", _chat_template_row(md)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name + ':':<{width + 1}} {value}" for name, value in rows]

    by_type: dict[str, list[int]] = {}
    for t in tensors:
        name = getattr(t.ggml_type, "name", str(t.ggml_type))
        count_bytes = by_type.setdefault(name, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += t.nbytes
    computable = _computable_types()
    lines += ["", f"{'tensor type':<12} {'count':>6} {'bytes':>14} {'size':>10}  supported"]
    for name, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        ok = "yes" if name in computable else "no"
        lines.append(f"{name:<12} {count:>6} {nbytes:>14,} {_size(nbytes):>10}  {ok}")
    total = sum(b for _, b in by_type.values())
    lines.append(f"{'total':<12} {len(tensors):>6} {total:>14,} {_size(total):>10}")
    unsupported = sorted(set(by_type) - computable)
    if unsupported:
        lines.append(
            f"llcuda cannot compute tensor type(s) {', '.join(unsupported)}: the file will not "
            f"load (supported: {', '.join(sorted(computable))})"
        )
    return "\n".join(lines)


def _chat_template_row(metadata) -> str:
    from llcuda.gguf.chat_template import ChatTemplateError, chat_template_from_metadata

    try:
        template = chat_template_from_metadata(metadata)
    except ChatTemplateError as exc:  # the file's template does not compile
        return f"yes, but it does not compile: {exc}"
    if template.name == "gguf":  # the file's own tokenizer.chat_template
        return "yes"
    if not template.available:
        return f"no; chat is refused: {template.origin}"
    return f"no; chat uses the {template.origin.split(' (the file')[0]}"


def _head_dim(n_embd: object, n_head: object) -> object:
    """llama.cpp's default when attention.key_length is absent: n_embd / n_head."""
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
        return n_embd // n_head
    return "?"


def _architecture_support(arch: object) -> str:
    """Whether llcuda runs `arch`: it needs a model class (models/registry.py's MODELS)."""
    from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES
    from llcuda.models.registry import MODELS

    runs = ", ".join(sorted(MODELS))
    if arch in MODELS:
        return f"supported: llcuda runs it with {MODELS[arch].__name__}"
    if arch in SUPPORTED_ARCHITECTURES:
        return (
            f"not supported yet: llcuda reads its metadata and tokenizer but has no model for "
            f"it; it runs: {runs}"
        )
    return f"not supported: llcuda does not know this architecture; it runs: {runs}"


def _computable_types() -> set[str]:
    """Names of the GGML tensor types the reference path computes (kernels/dequant_ref.py)."""
    from llcuda.kernels.dequant_ref import SUPPORTED_TYPES

    return {t.name for t in SUPPORTED_TYPES}


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _file_type(value: object) -> str:
    if value is None:
        return "?"
    try:
        from gguf import LlamaFileType  # llama.cpp's llama_ftype names

        return f"{LlamaFileType(int(value)).name.removeprefix('MOSTLY_')} ({value})"
    except (ImportError, ValueError):
        return str(value)


# --- bench ----------------------------------------------------------------------------------


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="prompt and generation speed, like llama-bench (pp / tg tokens per second)",
        description="Measure prompt processing (pp) and generation (tg) speed, as llama-bench.",
        formatter_class=_HelpFormat,
    )
    p.add_argument("model", metavar="FILE_OR_NAME", help="a .gguf path or a known model name")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (pp)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="runs of each test")
    p.add_argument("-d", "--depth", type=int, default=0, help="tokens already in context for tg")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=99, help="layers on the GPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_tensor_parallel(p)
    _add_threads(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from llcuda.bench import run_bench

    path = resolve_model(args.model, verbose=True)
    result = run_bench(
        str(path), args.n_prompt, args.n_gen, args.repetitions, args.depth, args.device,
        args.gpu_layers, args.tensor_parallel_size, n_threads=args.threads,
    )  # fmt: skip
    print(result.markdown())
    return 0


# --- serve ----------------------------------------------------------------------------------


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (and llama-server's /completion, /tokenize)",
        description="Serve MODEL over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
        "/completion, /tokenize, /detokenize, /health, /metrics. SIGTERM aborts what is in "
        "flight and exits 0.",
        formatter_class=_HelpFormat,
    )
    p.add_argument("model", metavar="FILE_OR_NAME", nargs="?", default=EMBEDDED_MODEL,
                   help="a .gguf path or a known name")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("-np", "--n-parallel", type=int, default=-1,
                   help=f"sequences decoded together; -1 = auto, as llama-server: "
                        f"{AUTO_N_PARALLEL} sharing one KV pool of -c tokens")  # fmt: skip
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="the most tokens one sequence holds (prompt + generated)")  # fmt: skip
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per step")
    p.add_argument("-ub", "--ubatch-size", type=int, default=128, help="prefill chunk per sequence")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=99,
                   help="layers on the GPU (no effect on the CPU)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")  # fmt: skip
    _add_threads(p)
    _add_prefix_caching(p)
    _add_scheduler_steps(p)
    _add_tensor_parallel(p)
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="load the model N times (replica i on cuda:i, or all on the CPU) behind "
                        "this one server, each request to the replica with the fewest "
                        "outstanding requests")  # fmt: skip
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (text, @FILE to read it from a file, or a builtin name: "
        "gemma, llama3, chatml, phi3); default: the file's, else the architecture's builtin",
    )
    # read from the environment in _serve, not as the default: --help prints defaults
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $LLCUDA_API_KEY if set, else "
        "no key)",
    )
    p.add_argument("--alias", default=None,
                   help="model id reported by /v1/models (default: the file's name)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no load progress, notices or start-up summary")  # fmt: skip
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from llcuda.server.app import serve
    except ImportError as exc:
        raise RuntimeError(
            f"llcuda serve needs the server extra ({exc.name} is missing): "
            f"pip install 'llcuda[server]'"
        ) from None
    from llcuda.api import InferenceEngine

    template = args.chat_template
    if template is not None and template.startswith("@"):
        with open(template[1:], encoding="utf-8") as f:
            template = f.read()
    extra = _engine_extra(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLCUDA_API_KEY")
    load_kwargs = dict(
        gpu_layers=args.gpu_layers, ctx_size=args.ctx_size, batch_size=args.batch_size,
        ubatch_size=args.ubatch_size, n_parallel=args.n_parallel, chat_template=template,
        verbose=not args.quiet, **extra,
    )  # fmt: skip
    if args.replicas != 1:
        from llcuda.server.replicas import ReplicaSet

        server_engine = ReplicaSet.load(args.model, args.replicas, **load_kwargs)
    else:
        server_engine = InferenceEngine()
        server_engine.load_model(args.model, **load_kwargs)
    with server_engine as engine:
        if not args.quiet:
            summary = serve_summary(engine.model_info(), engine.memory_report(), args.host,
                                    args.port, api_key is not None)  # fmt: skip
            print(summary, file=sys.stderr, flush=True)
        return serve(engine, args.host, args.port, api_key=api_key, model_name=args.alias)


def serve_summary(info: dict, memory: dict, host: str, port: int, api_key: bool) -> str:
    """What `llcuda serve` runs, printed once before it listens (llama-server logs the same)."""
    np_flag = "auto" if info.get("n_parallel_auto") else info["n_parallel"]
    pool = info["cache_size"]
    if pool < info["ctx_size"] * info["n_parallel"]:
        shared = "one pool shared by the slots"
    else:
        shared = f"{info['n_parallel']} x {info['ctx_size']}"
    kv = memory.get("kv_cache", 0)
    template = info.get("chat_template")
    rows = [
        ("model", f"{info['name']} ({info['path']})"),
        ("architecture", info["architecture"]),
        ("device", f"{info['device']} (gpu layers {info['gpu_layers']}/{info['num_layers'] + 1})"),
        ("context", f"{info['ctx_size']} tokens per sequence (model trained for "
                    f"{info['context_length']})"),
        ("slots", f"{info['n_parallel']} sequences decoded together (-np {np_flag})"),
        ("kv cache", f"{pool:,} tokens, {shared}, {_size(kv)}"),
        ("chat template", template if template else f"none: {info.get('chat_template_source')}"),
        ("listening", f"http://{host}:{port}"),
        ("api key", "on" if api_key else "off (anyone who reaches the port may use it)"),
    ]  # fmt: skip
    if info.get("replicas", 1) > 1:
        rows.insert(3, ("replicas", f"{info['replicas']} on {', '.join(info['replica_devices'])}"
                                    f", each request to the least loaded"))  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"llcuda serve: {name + ':':<{width + 1}} {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
