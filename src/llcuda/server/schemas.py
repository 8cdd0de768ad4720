"""Request bodies of the HTTP server: parse, check, and turn into engine arguments.

Checks are written out by hand rather than left to pydantic so that every bad body gets the same
OpenAI-shaped error, `{"error": {"message", "type", "code", "param"}}`, with a message that names
the field and what was wrong with it. Unknown fields are ignored (clients send many we do not use).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from llcuda.logprobs_format import OPENAI_MAX_LOGPROBS
from llcuda.sampling_params import DEFAULT_TEMPERATURE, MAX_LOGPROBS

_MISSING = object()
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below this


class APIError(Exception):
    """An error the client caused (4xx) or one we report as such; rendered by `body()`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.status,
                "param": self.param,
            }
        }


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


MAX_DEPTH = 32  # no field of any route nests deeper than a few levels (chat content parts)
MAX_INT_DIGITS = 32  # seeds are below 2**64 (20 digits); token ids, counts and lengths far less


class BadNumber:
    """A JSON number no field can use (NaN, Infinity, 1e400, a 5,000-digit integer), kept as a
    marker by the parser so that the field it sits in is named in the error, not the body.
    Converting such integers would raise Python's int-string limit (4,300 digits) as a 500."""

    def __init__(self, text: str, why: str) -> None:
        self.text = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        self.why = why

    def __repr__(self) -> str:
        return f"{self.text} ({self.why})"


def _parse_int(text: str) -> int | BadNumber:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return BadNumber(text, f"a {digits}-digit integer is out of range")
    return int(text)


def _parse_float(text: str) -> float | BadNumber:
    value = float(text)
    if not math.isfinite(value):
        return BadNumber(text, "beyond the range of a double")
    return value


def _parse_constant(text: str) -> BadNumber:
    return BadNumber(text, "NaN and Infinity are not JSON numbers")


def show(value: Any, limit: int = 80) -> str:
    """`value` as JSON for an error message, cut to `limit` characters."""
    text = repr(value) if isinstance(value, BadNumber) else json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong with it.

    Bounded for hostile bodies: nesting past the C parser's recursion limit is a 400, not a
    RecursionError; the parsed object is walked without recursion and refused past MAX_DEPTH
    (so later checks and error messages cannot recurse deeply); every string, key or value,
    must be valid Unicode (a lone surrogate such as \\ud800 cannot be encoded as UTF-8, so the
    answer that echoes it would fail half-sent).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(
            f"request body is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        ) from None
    if not text.strip():
        raise bad("request body is empty: send a JSON object")
    try:
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)  # fmt: skip
    except json.JSONDecodeError as exc:
        raise bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad(f"request body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Refuse nesting past MAX_DEPTH and strings that are not valid Unicode, naming the place.
    Paths are (parent, key) links, rendered only for the error: a long key costs nothing more."""
    stack: list[tuple[Any, tuple | None, int]] = [(body, None, 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, where)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                path = _render(where)
                raise bad(f"'{_printable(path)}' nests deeper than {MAX_DEPTH} levels", _top(path))
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_unicode(key, (where, key))
                    stack.append((item, (where, key), depth + 1))
            else:
                stack.extend((item, (where, i), depth + 1) for i, item in enumerate(value))


def _check_unicode(text: str, where: tuple | None) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = f"\\u{ord(text[exc.start]):04x}"
        path = _render(where)
        raise bad(
            f"'{_printable(path)}' holds a lone surrogate ({char}) at index {exc.start}: "
            f"strings must be valid Unicode",
            _top(path),
        ) from None


def _render(where: tuple | None) -> str:
    """`messages[0].content` from the links ((((None, 'messages'), 0), 'content'))."""
    parts = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".")


def _printable(path: str, limit: int = 80) -> str:
    """`path` cut to `limit` characters, non-ASCII (surrogates too) as escapes."""
    text = path.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def _top(path: str) -> str:
    """The top-level field of a path such as `messages[0].content` (printable: the field's
    own name may hold the surrogate)."""
    return _printable(re.split(r"[.\[]", path, maxsplit=1)[0])


# --- typed field getters ------------------------------------------------------------------------


def get_int(body: dict, name: str, default: Any, low: int | None = None, high: int | None = None):
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    # JSON has one number type: 16.0 is an acceptable 16, 16.5 is not
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, BadNumber):
        raise bad(f"'{name}' is not a usable number: {value!r}", name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {show(value)}", name)
    if low is not None and value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name)
    return value


def get_float(body: dict, name: str, default: Any, low: float | None = None,
              high: float | None = None):  # fmt: skip
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, BadNumber):
        raise bad(f"'{name}' is not a usable number: {value!r}", name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {show(value)}", name)
    if low is not None and value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name)
    return float(value)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {show(value)}", name)
    return value


def get_str(body: dict, name: str) -> str:
    """A required string field."""
    if name not in body:
        raise bad(f"'{name}' is required", name)
    value = body[name]
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {show(value)}", name)
    return value


def get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad(f"'stop' must be a string or a list of strings, got {show(value)}", "stop")
    return [s for s in value if s]  # OpenAI ignores empty stop strings


def get_seed(body: dict) -> int | None:
    """-1 (llama.cpp) or absent: a random seed."""
    seed = get_int(body, "seed", None, low=-1, high=_SEED_LIMIT - 1)
    return None if seed == -1 else seed


def get_prompt(body: dict) -> str:
    """`prompt` as one string; OpenAI's one-element list of strings is accepted too."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad(
            f"'prompt' must be a string (batches and token-id prompts are not supported), "
            f"got {show(prompt)}",
            "prompt",
        )
    return prompt


# --- request kinds --------------------------------------------------------------------------------


@dataclass
class GenerateRequest:
    """One parsed generation request: what to run and how to answer."""

    sampling: dict  # keyword arguments of InferenceEngine.infer_stream / chat_stream
    stream: bool
    prompt: str | None = None  # completions
    messages: list | None = None  # chat
    echo: bool = False
    include_usage: bool = False
    return_tokens: bool = False  # llama-server's: the generated token ids in the answer
    extra: dict = field(default_factory=dict)
    tools: Any = None  # chat: the checked tools / tool_choice (llcuda.structured ToolSpec)


def _sampling(body: dict, ctx_size: int, max_name: str, defaults: dict) -> dict:
    """Sampling knobs shared by every endpoint. max_tokens is bounded by ctx_size."""
    max_tokens = defaults["max_tokens"]
    for name in (max_name, *defaults.get("max_aliases", ())):
        if body.get(name) is not None:
            low = -1 if max_name == "n_predict" else 0
            max_tokens = get_int(body, name, None, low=low, high=ctx_size)
            break
    if max_tokens is None or max_tokens < 0:  # -1 (llama.cpp) or absent: until ctx or EOS
        max_tokens = ctx_size
    for name in ("presence_penalty", "frequency_penalty"):
        if get_float(body, name, 0.0) != 0.0:
            raise bad(f"'{name}' is not supported (only 0)", name)
    if get_int(body, "n", 1) != 1:
        raise bad("'n' must be 1: one choice per request", "n")
    return {
        "max_tokens": max_tokens,
        "temperature": get_float(body, "temperature", defaults["temperature"], low=0.0),
        "top_k": get_int(body, "top_k", 40),
        "top_p": get_float(body, "top_p", defaults["top_p"], low=0.0, high=1.0),
        "min_p": get_float(body, "min_p", 0.05, low=0.0, high=1.0),
        "repeat_penalty": get_float(body, "repeat_penalty", 1.0, low=0.0),
        "repeat_last_n": get_int(body, "repeat_last_n", 64, low=-1),
        "seed": get_seed(body),
        "stop": get_stop(body),
        "ignore_eos": get_bool(body, "ignore_eos", False),
    }


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad(f"'stream_options.include_usage' must be true or false, got "
                  f"{show(include_usage)}", "stream_options")  # fmt: skip
    return bool(include_usage)


# llama-server's sampling defaults on its OpenAI routes too (not OpenAI's 1.0 / 1.0): the same
# temperature and top_p as the Python API and `llcuda generate`
_OPENAI_DEFAULTS = {"max_tokens": None, "temperature": DEFAULT_TEMPERATURE, "top_p": 0.95}


# OpenAI's response_format, and llama-server's grammar / json_schema, which llama-server also takes
# on its OpenAI routes (clients written for it send them there)
_CONSTRAINT_FIELDS = ("grammar", "json_schema", "response_format")


def parse_completion(body: dict, ctx_size: int) -> GenerateRequest:
    """POST /v1/completions."""
    prompt = get_prompt(body)
    stream = get_bool(body, "stream", False)
    echo = get_bool(body, "echo", False)
    return GenerateRequest(
        sampling={**_sampling(body, ctx_size, "max_tokens", _OPENAI_DEFAULTS),
                  "logprobs": completion_logprobs_field(body, echo),
                  **get_constraint(body)},  # fmt: skip
        stream=stream,
        prompt=prompt,
        echo=echo,
        include_usage=_stream_options(body, stream),
        return_tokens=get_bool(body, "return_tokens", False),
    )


def parse_chat(body: dict, ctx_size: int) -> GenerateRequest:
    """POST /v1/chat/completions. Message contents are checked by the engine (ValueError)."""
    if "messages" not in body:
        raise bad("'messages' is required", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    stream = get_bool(body, "stream", False)
    defaults = {**_OPENAI_DEFAULTS, "max_aliases": ("max_completion_tokens",)}
    tools = get_tools(body)
    return GenerateRequest(
        sampling={**_sampling(body, ctx_size, "max_tokens", defaults),
                  "logprobs": chat_logprobs_field(body),
                  **get_constraint(body),
                  **({"tools": tools} if tools is not None else {})},  # fmt: skip
        stream=stream,
        messages=messages,
        include_usage=_stream_options(body, stream),
        return_tokens=get_bool(body, "return_tokens", False),
        tools=tools,
    )


def parse_llama_completion(body: dict, ctx_size: int) -> GenerateRequest:
    """POST /completion (llama-server): n_predict -1 = until ctx or EOS; its defaults."""
    defaults = {"max_tokens": None, "temperature": 0.8, "top_p": 0.95}
    return GenerateRequest(
        sampling={**_sampling(body, ctx_size, "n_predict", defaults),
                  "logprobs": n_probs_field(body),
                  **get_constraint(body)},
        stream=get_bool(body, "stream", False),
        prompt=get_prompt(body),
        return_tokens=get_bool(body, "return_tokens", False),
    )


# --- log-probs: each route's fields as SamplingParams.logprobs (None: none asked for) -------------

def completion_logprobs_field(body: dict, echo: bool) -> int | None:
    """/v1/completions `logprobs`: the alternatives per token, 0-20 (0: the sampled token's
    log-prob only)."""
    logprobs = get_int(body, "logprobs", None, low=0, high=OPENAI_MAX_LOGPROBS)
    if logprobs is not None and echo:
        raise bad("'logprobs' with 'echo' (the prompt's log-probs) is not supported", "logprobs")
    return logprobs


def chat_logprobs_field(body: dict) -> int | None:
    """/v1/chat/completions `logprobs` (true/false) and `top_logprobs` (0-20, needs logprobs)."""
    logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, low=0, high=OPENAI_MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if logprobs else None


def n_probs_field(body: dict) -> int | None:
    """/completion `n_probs` (llama-server): 0, its default, reports none. Its probabilities
    are the model's raw ones; `post_sampling_probs` (after the sampler chain) is not offered."""
    if get_bool(body, "post_sampling_probs", False):
        raise bad("'post_sampling_probs' is not supported: n_probs reports the model's raw "
                  "log-probs", "post_sampling_probs")  # fmt: skip
    n_probs = get_int(body, "n_probs", 0, low=0, high=MAX_LOGPROBS)
    return n_probs or None


# --- structured output and tools ------------------------------------------------------------------


def get_constraint(body: dict) -> dict:
    """{"structured": StructuredOutput} from the body's constraint fields (_CONSTRAINT_FIELDS:
    OpenAI's response_format; llama-server's grammar / json_schema), or {}; a 400 naming the
    field."""
    from llcuda.structured.request_args import constraint_from_args

    given = {n: body[n] for n in _CONSTRAINT_FIELDS if body.get(n) is not None}
    if not given:
        return {}
    if "grammar" in given and given["grammar"] == "":
        return {}  # llama-server sends an empty grammar for "none"
    try:
        constraint = constraint_from_args(**given)
    except ValueError as exc:
        raise bad(str(exc), next((n for n in _CONSTRAINT_FIELDS if str(exc).startswith(n)), None)
                  ) from None  # fmt: skip
    return {"structured": constraint} if constraint is not None else {}


def get_tools(body: dict) -> Any:
    """The checked tools / tool_choice of a chat body (a ToolSpec), or None; a 400 naming the
    field."""
    from llcuda.structured.tool_calls import check_tools

    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None and choice is None:
        return None
    try:
        return check_tools(tools, choice)
    except ValueError as exc:
        raise bad(str(exc), "tool_choice" if str(exc).startswith("tool_choice") else "tools"
                  ) from None  # fmt: skip


def parse_tokenize(body: dict) -> tuple[str, bool, bool]:
    """POST /tokenize: (content, add_special, parse_special), llama-server's defaults."""
    content = get_str(body, "content")
    return content, get_bool(body, "add_special", False), get_bool(body, "parse_special", True)


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    """POST /detokenize: the token ids, each in [0, vocab_size)."""
    tokens = body.get("tokens", _MISSING)
    if tokens is _MISSING:
        raise bad("'tokens' is required", "tokens")
    if not isinstance(tokens, list):
        raise bad(f"'tokens' must be a list of token ids, got {show(tokens)}", "tokens")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise bad(f"'tokens[{i}]' must be a token id in [0, {vocab_size}), got {show(t)}",
                      "tokens")  # fmt: skip
    return tokens
