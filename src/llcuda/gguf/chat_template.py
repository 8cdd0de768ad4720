"""Chat templates: turn OpenAI-style messages into the prompt text a model was trained on.

Templates are Jinja, rendered the way Hugging Face `transformers` does
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls, a
`raise_exception` helper, `strftime_now`, and a `tojson` that keeps non-ASCII text).
`chat_template_from_metadata` picks, in order: an explicit override (a template string or a
builtin name), the GGUF's `tokenizer.chat_template`, or -- as llama.cpp falls back to its
built-in templates (llm_chat_apply_template) -- a builtin: the one of `general.architecture`
(gemma*: gemma, llama: llama3, qwen2/qwen3: chatml, phi3: phi3), else the one whose turn
markers the vocabulary has (a `llama` file of SmolLM2 carries ChatML's). A builtin is only
chosen when the vocabulary holds its turn markers as tokens: without them the markers would be
tokenized as plain text and the model would answer gibberish. Where nothing fits, the result is
an `UnavailableChatTemplate` whose `render` raises a ChatTemplateError saying so: the model
loads, completions work, chat is refused. Every template says where it came from (`origin`).

Engine note: a rendered chat that already starts with the BOS text (the Gemma template does,
see `ChatTemplate.adds_bos`) must be tokenized with `add_special=False`, or the prompt gets two
BOS tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the messages were malformed."""


# Official Gemma format: no system role (a system message is folded into the first user turn),
# roles user/model alternating, each turn "<start_of_turn>{role}\n{content}<end_of_turn>\n".
GEMMA_TEMPLATE = """{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
    {%- set first_user_prefix = messages[0].content + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/model/user/model/...') -}}
    {%- endif -%}
    {%- set role = 'model' if message.role == 'assistant' else message.role -%}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
    {{- message.content | trim -}}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# Llama 3 instruct format: header per message, content trimmed, <|eot_id|> after each.
LLAMA3_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' -}}
    {{- message.content | trim -}}
    {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

# ChatML (Qwen 2/3 and many others): no BOS.
CHATML_TEMPLATE = """{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

# Phi-3 format, as llama.cpp's LLM_CHAT_TEMPLATE_PHI_3: "<|{role}|>\n{content}<|end|>\n" per
# message; no BOS in the text (the tokenizer adds it where the file says so).
PHI3_TEMPLATE = """{%- for message in messages -%}
    {{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
}
# the tokens each builtin's turns are made of: a vocabulary without them cannot use it
BUILTIN_MARKERS: dict[str, tuple[str, ...]] = {
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}
_ALIASES = {
    "gemma2": "gemma", "gemma3": "gemma", "llama-3": "llama3", "qwen": "chatml", "phi-3": "phi3",
}  # fmt: skip
_ARCH_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "phi3": "phi3",
}


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: plain json.dumps, no HTML escaping (jinja's builtin escapes < > & ').
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"{where}.content must be a string or a list of text parts, "
            f"got {type(content).__name__}"
        )
    # Text parts are joined with newlines, as llama-server does.
    text = ""
    for j, part in enumerate(content):
        if not (
            isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            raise ChatTemplateError(
                f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, "
                f"got {part!r:.80}"
            )
        if text:
            text += "\n"
        text += part["text"]
    return text


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and return copies whose `content` is a plain string."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where} must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"{where}.role must be a string")
        if "content" not in message:
            raise ChatTemplateError(f"{where}.content is missing")
        out.append({**message, "content": _text_content(message["content"], where)})
    return out


class ChatTemplate:
    """A compiled Jinja chat template plus the BOS/EOS texts it may refer to."""

    available = True  # UnavailableChatTemplate: False

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom",
                 origin: str = "given as source"):  # fmt: skip
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template source must be a non-empty string")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        self.origin = origin  # where the template came from, for model_info and load messages
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {name!r} does not compile: {e}") from e
        self._adds_bos: bool | None = None

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Prompt text for `messages`; extra keyword arguments reach the template (e.g. tools)."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.sandbox.SecurityError as e:
            raise ChatTemplateError(f"chat template {self.name!r} broke the sandbox: {e}") from e
        except Exception as e:  # any failure inside the template is the template's (or input's)
            raise ChatTemplateError(
                f"chat template {self.name!r} failed: {type(e).__name__}: {e}"
            ) from e

    @property
    def adds_bos(self) -> bool:
        """True when the rendered chat starts with the BOS text: tokenize it with
        add_special=False then."""
        if self._adds_bos is None:
            if not self.bos_token:
                self._adds_bos = False
            else:
                try:
                    probe = self.render([{"role": "user", "content": "x"}])
                except ChatTemplateError:
                    probe = ""
                self._adds_bos = probe.startswith(self.bos_token)
        return self._adds_bos

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r})"


class UnavailableChatTemplate:
    """Stands where a model has no usable chat template: `render` raises, saying why."""

    available = False
    name = None
    adds_bos = False

    def __init__(self, reason: str) -> None:
        self.origin = reason

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:  # fmt: skip
        raise ChatTemplateError(f"this model cannot chat: {self.origin}")

    def __repr__(self) -> str:
        return f"UnavailableChatTemplate({self.origin!r})"


def builtin_template_source(name: str) -> str:
    """Source of a builtin template by name ("gemma", "llama3", "chatml" or an alias)."""
    key = _ALIASES.get(name, name)
    try:
        return BUILTIN_TEMPLATES[key]
    except KeyError:
        known = ", ".join(sorted([*BUILTIN_TEMPLATES, *_ALIASES]))
        raise ChatTemplateError(
            f"unknown builtin chat template {name!r} (known: {known})"
        ) from None


def _special_text(metadata: Mapping[str, Any], key: str, default: int | None) -> str:
    tokens = metadata.get("tokenizer.ggml.tokens")
    tid = metadata.get(key, default)
    # wrongly typed metadata (the tokenizer refuses it at load; `llcuda info` still describes it)
    if not isinstance(tokens, list) or isinstance(tid, bool) or not isinstance(tid, int):
        return ""
    if not 0 <= tid < len(tokens):
        return ""
    text = tokens[int(tid)]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _vocab_texts(metadata: Mapping[str, Any]) -> set[str] | None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, (list, tuple)):
        return None
    return {t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in tokens}


def _builtin_for(metadata: Mapping[str, Any], arch: Any) -> tuple[str | None, str]:
    """(builtin name or None, why): the architecture's builtin if the vocabulary has its turn
    markers (or there is no vocabulary to check), else the first builtin whose markers it has."""
    vocab = _vocab_texts(metadata)
    arch_key = _ARCH_TEMPLATES.get(arch) if isinstance(arch, str) else None
    if arch_key is not None and (vocab is None or set(BUILTIN_MARKERS[arch_key]) <= vocab):
        return arch_key, f"builtin {arch_key!r}, the known template of architecture {arch!r}"
    for key, markers in BUILTIN_MARKERS.items():
        if vocab is not None and set(markers) <= vocab:
            found = ", ".join(markers)
            return key, f"builtin {key!r}, chosen because the vocabulary has its tokens {found}"
    if arch_key is not None:
        missing = ", ".join(m for m in BUILTIN_MARKERS[arch_key] if m not in (vocab or ()))
        return None, (
            f"the known template of architecture {arch!r} ({arch_key!r}) needs the tokens "
            f"{missing}, which the vocabulary lacks, and no other builtin's tokens are there"
        )
    return None, (
        f"no builtin template for architecture {arch!r} and the vocabulary has none of the "
        f"builtins' turn tokens"
    )


def chat_template_from_metadata(
    metadata: Mapping[str, Any], override: str | None = None
) -> ChatTemplate | UnavailableChatTemplate:
    """The chat template for a GGUF model: `override` (template source or builtin name), else
    `tokenizer.chat_template`, else a builtin (see the module doc), else an
    UnavailableChatTemplate that refuses chat with the reason."""
    # BOS/EOS texts with llama.cpp's default ids (SPM 1/2, BPE 11/11) when the file has none.
    model = metadata.get("tokenizer.ggml.model")
    bos_default, eos_default = (11, 11) if model == "gpt2" else (1, 2)
    bos = _special_text(metadata, "tokenizer.ggml.bos_token_id", bos_default)
    eos = _special_text(metadata, "tokenizer.ggml.eos_token_id", eos_default)
    if override is not None:
        if not isinstance(override, str):
            raise ChatTemplateError(
                f"chat template override must be a string, got {type(override).__name__}"
            )
        if "{{" in override or "{%" in override:
            return ChatTemplate(override, bos, eos, name="override", origin="override (Jinja)")
        key = _ALIASES.get(override, override)
        source = builtin_template_source(override)
        return ChatTemplate(source, bos, eos, name=key, origin=f"override (builtin {key!r})")
    source = metadata.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        origin = "the file's tokenizer.chat_template"
        return ChatTemplate(source, bos, eos, name="gguf", origin=origin)
    arch = metadata.get("general.architecture")
    key, why = _builtin_for(metadata, arch)
    if key is None:
        return UnavailableChatTemplate(
            f"the file has no tokenizer.chat_template and {why}; pass a chat template "
            f"(load_model(chat_template=...) or --chat-template: one of "
            f"{', '.join(sorted(BUILTIN_TEMPLATES))}, or Jinja source)"
        )
    origin = f"{why} (the file has no tokenizer.chat_template)"
    return ChatTemplate(BUILTIN_TEMPLATES[key], bos, eos, name=key, origin=origin)
