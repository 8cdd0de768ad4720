#!/usr/bin/env python3
"""Write a golden file (tests/data/golden/*.json) from llama.cpp's llama-server, CPU build.

llama.cpp is the oracle here, never a dependency of llcuda: this script only talks HTTP to a
llama-server (standard library only, plus `gguf` for the model facts of the "full" format).

    # the CPU build: /work/shared/peer/llamacpp-cpu/llamacpp-cpu-x86_64.tar.xz (its README.md)
    mkdir -p /tmp/lcpp-cpu && tar xJf llamacpp-cpu-x86_64.tar.xz -C /tmp/lcpp-cpu
    # regenerate a stored golden from its own cases, and compare with it
    python scripts/make_golden.py --llama-server /tmp/lcpp-cpu/llama-server -m MODEL.gguf \
        --cases tests/data/golden/X.json --out /tmp/X.json --compare tests/data/golden/X.json
    # or against a llama-server that is already running
    python scripts/make_golden.py --server http://127.0.0.1:8090 -m MODEL.gguf --cases ...

With --llama-server the script starts llama-server exactly as the stored goldens were made
(`-m MODEL -c 4096 -np 1 -t 2 --host 127.0.0.1 --port PORT`, everything else default: flash
attention auto, KV f16, n_batch 2048, n_ubatch 512, one slot) and stops it at the end.

--cases is either a stored golden (its texts, prompts and chat messages are asked again, and the
output has its shape) or a new file of the same shape with only the inputs:
    {"format": "basic" | "full",
     "tokenize": ["text", ...],                  # full: asked with add_special true and false
     "tokenize_literal_special": ["text", ...],  # full only: parse_special false
     "greedy": [{"prompt": "...", "kind": "raw"}, {"messages": [...]}, ...]}
"basic" is the Gemma 3 270M golden's shape (ids only), "full" the SmolLM2 one's (pieces,
detokenized text, chat via /apply-template and /v1/chat/completions, server and model facts).

Requests (the same for every golden): /tokenize (parse_special true, with_pieces), /detokenize,
/apply-template for chat prompts, and /completion with temperature 0, top_k 1, n_predict 32,
n_probs 5, cache_prompt false, return_tokens true, seed 1. n_probs log-probabilities are the full
softmax of the raw logits before any sampler (post_sampling_probs false).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GREEDY_REQUEST = {
    "n_predict": 32,
    "temperature": 0,
    "top_k": 1,
    "n_probs": 5,
    "cache_prompt": False,
    "return_tokens": True,
    "seed": 1,
    "ignore_eos": False,
}
SERVER_ARGS = ["-c", "4096", "-np", "1", "-t", "2"]
NEAR_TIE = 0.05  # a top-2 gap under this: where llama.cpp's 8-bit activations may flip the argmax
SOURCE = "llama.cpp llama-server (CPU build, vendored in llama-cpp-python 0.3.36)"
SERVER_TIMEOUT_S = 600  # one request; a 700-token prompt takes seconds on 2 busy cores


class Server:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + route, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_S) as response:
            return json.loads(response.read())

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=SERVER_TIMEOUT_S) as response:
            return json.loads(response.read())


def start_llama_server(binary: str, model: str) -> tuple[subprocess.Popen, Server]:
    """llama-server on 127.0.0.1 at a free port, up to two minutes to load; its LD_LIBRARY_PATH
    gets the binary's folder (the CPU build bundles libgomp.so.1 there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "-m", model, *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ)
    folder = str(Path(binary).resolve().parent)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (folder, env.get("LD_LIBRARY_PATH")) if p)
    # its log goes to a file: a pipe nobody reads fills up and stops the server mid-request
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = Server(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise SystemExit(f"llama-server exited ({proc.returncode}), log {log.name}: {tail}")
        try:
            if server.get("/health").get("status") == "ok":
                return proc, server
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise SystemExit("llama-server did not come up within 120 s")


# --- cases ------------------------------------------------------------------------------------


def cases_from(data: dict) -> dict:
    """The inputs of a cases file or of a stored golden (whose outputs are ignored)."""
    fmt = data.get("format") or ("full" if "meta" in data else "basic")

    def texts(entries) -> list[str]:
        seen: list[str] = []
        for e in entries:
            text = e if isinstance(e, str) else e["text"]
            if text not in seen:
                seen.append(text)
        return seen

    greedy = []
    for g in data.get("greedy", []):
        if "messages" in g:
            greedy.append({"messages": g["messages"], "kind": "chat"})
        elif g.get("kind") == "chat":
            greedy.append({"messages": g["chat"]["messages"], "kind": "chat"})
        else:
            greedy.append({"prompt": g["prompt"], "kind": g.get("kind", "raw")})
    return {
        "format": fmt,
        "tokenize": texts(data.get("tokenize", [])),
        "tokenize_literal_special": texts(data.get("tokenize_literal_special", [])),
        "greedy": greedy,
    }


# --- requests ---------------------------------------------------------------------------------


def tokenize(server: Server, text: str, add_special: bool, parse_special: bool, full: bool):
    reply = server.post("/tokenize", {"content": text, "add_special": add_special,
                                      "parse_special": parse_special, "with_pieces": True})
    ids = [t["id"] for t in reply["tokens"]]
    entry = {"text": text, "add_special": add_special, "parse_special": parse_special, "ids": ids}
    if full:
        entry["pieces"] = [t["piece"] for t in reply["tokens"]]
        entry["detokenized"] = server.post("/detokenize", {"tokens": ids})["content"]
        entry["roundtrip"] = entry["detokenized"] == text
    return entry


def greedy(server: Server, case: dict, full: bool) -> dict:
    chat = None
    if "messages" in case:
        prompt = server.post("/apply-template", {"messages": case["messages"]})["prompt"]
        chat = chat_completion(server, case["messages"])
    else:
        prompt = case["prompt"]
    prompt_ids = tokenize(server, prompt, True, True, full=False)["ids"]
    reply = server.post("/completion", {"prompt": prompt, **GREEDY_REQUEST})
    steps = [
        {"id": p["id"], "token": p["token"],
         "top": [{"id": t["id"], "token": t["token"], "logprob": t["logprob"]}
                 for t in p["top_logprobs"]]}
        for p in reply["completion_probabilities"]
    ]  # fmt: skip
    if [s["id"] for s in steps] != reply["tokens"]:
        raise SystemExit(f"/completion's probabilities do not follow its tokens: {prompt[:60]!r}")
    entry = {"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": reply["tokens"],
             "text": reply["content"], "stop_type": reply["stop_type"], "steps": steps}
    if full:
        gaps = [s["top"][0]["logprob"] - s["top"][1]["logprob"] for s in steps]
        entry["kind"] = case.get("kind", "raw")
        entry["n_prompt_tokens"] = reply["tokens_evaluated"]
        entry["first_near_tie"] = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), None)
        if chat is not None:
            chat["same_tokens_as_completion"] = chat["tokens"] == [s["token"] for s in steps]
            entry["chat"] = {
                "messages": case["messages"],
                "template_via": "POST /apply-template (model's own chat template, "
                                "add_generation_prompt)",
                "chat_completion": chat,
            }  # fmt: skip
    return entry


def chat_completion(server: Server, messages: list[dict]) -> dict:
    body = {"messages": messages, "max_tokens": GREEDY_REQUEST["n_predict"], "temperature": 0,
            "top_k": 1, "seed": 1, "cache_prompt": False, "logprobs": True}
    reply = server.post("/v1/chat/completions", body)
    choice = reply["choices"][0]
    return {
        "content": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
        "tokens": [t["token"] for t in choice["logprobs"]["content"]],
        "usage": reply["usage"],
    }


def model_facts(model: str) -> dict:
    """The GGUF facts the "full" format records (read with gguf-py, not with llcuda)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(model)

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()[0]
        # float32 values as their shortest float32 text (1e-05, not 9.999999747378752e-06)
        return float(repr(np.float32(value))) if isinstance(value, float) else value

    arch = field("general.architecture")
    names = [t.name for t in reader.tensors]
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "architecture": arch,
        "tokenizer.ggml.model": field("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": field("tokenizer.ggml.pre"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "unknown_token_id": field("tokenizer.ggml.unknown_token_id"),
        "vocab": len(reader.fields["tokenizer.ggml.tokens"].data),
        "n_layer": field(f"{arch}.block_count"),
        "n_embd": field(f"{arch}.embedding_length"),
        "n_ff": field(f"{arch}.feed_forward_length"),
        "n_head": field(f"{arch}.attention.head_count"),
        "n_head_kv": field(f"{arch}.attention.head_count_kv"),
        "rope_freq_base": field(f"{arch}.rope.freq_base"),
        "rms_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "context_length": field(f"{arch}.context_length"),
        "tied_embeddings": "output.weight" not in names,
        "tensor_types": types,
    }


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_golden(server: Server, model: str, cases: dict, server_cmd: str) -> dict:
    full = cases["format"] == "full"
    props = server.get("/props")
    source = SOURCE
    if full:
        commit = props["build_info"].split("-")[-1]
        source = source[:-1] + f", llama.cpp commit {commit} of 2026-10-01)"
    golden: dict = {
        "source": f"{source}, greedy, n_probs={GREEDY_REQUEST['n_probs']}",
        "model": f"{Path(model).name} (sha256 {sha256_of(model)})",
        "tokenize": [],
    }
    specials = (True, False) if full else (True,)
    for text in cases["tokenize"]:
        for add_special in specials:
            golden["tokenize"].append(tokenize(server, text, add_special, True, full))
    golden["greedy"] = []
    for i, case in enumerate(cases["greedy"]):
        print(f"make_golden: greedy {i + 1}/{len(cases['greedy'])}", file=sys.stderr, flush=True)
        golden["greedy"].append(greedy(server, case, full))
    if full:
        golden["tokenize_literal_special"] = [
            tokenize(server, t, False, False, full) for t in cases["tokenize_literal_special"]
        ]
        golden["meta"] = {
            "server_cmd": server_cmd,
            "build_info": props["build_info"],
            "chat_template": props.get("chat_template"),
            "n_ctx": props["default_generation_settings"]["n_ctx"],
            "v1_models": server.get("/v1/models"),
            "greedy_request": GREEDY_REQUEST,
            "tokenize_request": {"parse_special": True, "add_special": [True, False],
                                 "with_pieces": True},
            "model_facts": model_facts(model),
        }  # fmt: skip
    return golden


# --- comparison -------------------------------------------------------------------------------


def compare(new: dict, old: dict) -> list[str]:
    """Differences that matter: tokenization and greedy ids exactly; log-probs reported."""
    problems = []
    for key in ("tokenize", "tokenize_literal_special"):
        a, b = new.get(key, []), old.get(key, [])
        if len(a) != len(b):
            problems.append(f"{key}: {len(a)} cases, stored {len(b)}")
        for x, y in zip(a, b, strict=False):
            for field in ("text", "add_special", "ids", "pieces", "detokenized"):
                if field in y and x.get(field) != y[field]:
                    problems.append(f"{key} {y['text']!r} add_special={y['add_special']}: "
                                    f"{field} {x.get(field)} != stored {y[field]}")
    worst = 0.0
    for x, y in zip(new["greedy"], old["greedy"], strict=False):
        for field in ("prompt", "prompt_ids", "output_ids", "text"):
            if x[field] != y[field]:
                problems.append(f"greedy {y['prompt'][:40]!r}: {field} differs")
        for sx, sy in zip(x["steps"], y["steps"], strict=False):
            if [t["id"] for t in sx["top"]] != [t["id"] for t in sy["top"]]:
                problems.append(f"greedy {y['prompt'][:40]!r}: top-5 ids differ at a step")
                break
            worst = max(worst, *(abs(a["logprob"] - b["logprob"])
                                 for a, b in zip(sx["top"], sy["top"], strict=False)))  # fmt: skip
    if len(new["greedy"]) != len(old["greedy"]):
        problems.append(f"greedy: {len(new['greedy'])} cases, stored {len(old['greedy'])}")
    print(f"make_golden: largest top-5 log-prob difference from the stored file: {worst:.3g}",
          file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--llama-server", help="llama-server binary to start (and stop)")
    where.add_argument("--server", help="URL of a running llama-server serving MODEL")
    parser.add_argument("-m", "--model", required=True, help="the .gguf file")
    parser.add_argument("--cases", required=True, help="a cases file or a stored golden")
    parser.add_argument("--out", required=True, help="where to write the golden JSON")
    parser.add_argument("--compare", help="a stored golden to check the new one against")
    args = parser.parse_args(argv)

    cases = cases_from(json.loads(Path(args.cases).read_text()))
    model_name = Path(args.model).name
    proc = None
    if args.llama_server:
        proc, server = start_llama_server(args.llama_server, args.model)
    else:
        server = Server(args.server)
    port = server.url.rsplit(":", 1)[-1]
    server_cmd = (f"llama-server -m {model_name} {' '.join(SERVER_ARGS)} --host 127.0.0.1 "
                  f"--port {port} (defaults otherwise: flash_attn auto -> enabled on CPU, KV f16, "
                  f"n_batch 2048, n_ubatch 512)")  # fmt: skip
    try:
        golden = make_golden(server, args.model, cases, server_cmd)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    Path(args.out).write_text(json.dumps(golden, indent=1, ensure_ascii=False))
    print(f"make_golden: wrote {args.out}", file=sys.stderr)
    if args.compare:
        problems = compare(golden, json.loads(Path(args.compare).read_text()))
        for p in problems:
            print(f"make_golden: DIFFERENCE {p}", file=sys.stderr)
        print(f"make_golden: {len(problems)} differences in tokenization and greedy ids",
              file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
