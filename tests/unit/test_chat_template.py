"""Chat templates: builtins, GGUF/override selection, message validation, sandboxing."""

from __future__ import annotations

import pytest

from llcuda.gguf.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    UnavailableChatTemplate,
    chat_template_from_metadata,
)
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.tokenizer import Tokenizer

GEMMA_MD = {
    "general.architecture": "gemma3",
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
    "tokenizer.ggml.bos_token_id": 2,
    "tokenizer.ggml.eos_token_id": 1,
}
USER = {"role": "user", "content": "Hi"}


def gemma() -> ChatTemplate:
    return chat_template_from_metadata(GEMMA_MD)


def test_gemma_builtin():
    t = gemma()
    assert t.name == "gemma" and t.bos_token == "<bos>" and t.eos_token == "<eos>"
    assert t.render([USER]) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert t.render([USER], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi  "},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": "Bye"},
    ]
    assert t.render(chat) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert t.adds_bos


def test_gemma_roles_must_alternate():
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma().render([USER, USER])
    with pytest.raises(ValueError, match="alternate"):
        gemma().render([{"role": "assistant", "content": "x"}])


def test_llama3_and_chatml_builtins():
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|im_start|>", "<|im_end|>"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    t = chat_template_from_metadata(md)
    assert t.name == "llama3" and t.adds_bos
    chat = [{"role": "system", "content": "S "}, {"role": "user", "content": "U"}]
    assert t.render(chat) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    t = chat_template_from_metadata({**md, "general.architecture": "qwen2"})
    assert t.name == "chatml" and not t.adds_bos
    assert t.render(chat) == (
        "<|im_start|>system\nS <|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_selection_order():
    gguf_md = {**GEMMA_MD, "tokenizer.chat_template": "{{ bos_token }}[{{ messages[0].content }}]"}
    t = chat_template_from_metadata(gguf_md)
    assert t.name == "gguf" and t.render([USER]) == "<bos>[Hi]"
    # an override wins: a builtin name or template source
    assert chat_template_from_metadata(gguf_md, override="chatml").name == "chatml"
    assert chat_template_from_metadata(gguf_md, override="gemma3").name == "gemma"
    t = chat_template_from_metadata(gguf_md, override="{{ messages | length }}")
    assert t.name == "override" and t.render([USER, USER]) == "2"
    with pytest.raises(ValueError, match="'nope'"):
        chat_template_from_metadata(gguf_md, override="nope")
    assert t.origin == "override (Jinja)"
    assert chat_template_from_metadata(gguf_md).origin == "the file's tokenizer.chat_template"
    builtin = chat_template_from_metadata(GEMMA_MD)
    assert "architecture 'gemma3'" in builtin.origin
    assert "no tokenizer.chat_template" in builtin.origin


def test_no_usable_template_refuses_chat_but_loads():
    t = chat_template_from_metadata({"general.architecture": "mamba"})
    assert isinstance(t, UnavailableChatTemplate) and not t.available and not t.adds_bos
    with pytest.raises(ChatTemplateError, match="cannot chat.*'mamba'.*chat_template"):
        t.render([USER])
    # gemma's template, but a vocabulary without its turn tokens: the markers would be plain text
    plain = {**GEMMA_MD, "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "a"]}
    t = chat_template_from_metadata(plain)
    assert not t.available
    with pytest.raises(ValueError, match="<start_of_turn>, <end_of_turn>"):
        t.render([USER])


def test_builtin_chosen_by_vocabulary_and_phi3():
    # a `llama` file without Llama 3's header tokens but with ChatML's (SmolLM2's case)
    smollm = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"],
        "tokenizer.ggml.bos_token_id": 1,
    }
    t = chat_template_from_metadata(smollm)
    assert t.name == "chatml" and "<|im_start|>" in t.origin
    phi3 = {
        "general.architecture": "phi3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
    }
    t = chat_template_from_metadata(phi3)
    assert t.name == "phi3" and not t.adds_bos  # the tokenizer adds <s>
    chat = [{"role": "system", "content": "S"}, USER]
    assert t.render(chat) == "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert chat_template_from_metadata(GEMMA_MD, override="phi-3").name == "phi3"


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    t = ChatTemplate("{{ messages[0].content }}")
    assert t.render([{"role": "user", "content": parts}]) == "a\nb"


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hi", "messages must be a list"),
        ([], "must not be empty"),
        ([USER, "x"], r"messages\[1\] must be a dict"),
        ([USER, USER, {"role": 3, "content": "x"}], r"messages\[2\]\.role must be a string"),
        ([{"role": "user"}], r"messages\[0\]\.content is missing"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], r"content\[0\] must be a text"),
    ],
)
def test_message_validation(messages, match):
    with pytest.raises(ValueError, match=match):
        gemma().render(messages)


def test_helpers_and_errors():
    t = ChatTemplate("{{ tools | tojson }}|{{ strftime_now('%Y') | length }}")
    assert t.render([USER], tools=[{"name": "é<x>"}]) == '[{"name": "é<x>"}]|4'
    with pytest.raises(ValueError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([USER])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ValueError, match="sandbox"):
        ChatTemplate("{{ messages.append(1) }}").render([USER])
    with pytest.raises(ValueError, match="sandbox"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([USER])
    with pytest.raises(ValueError, match="TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}").render([USER])
    with pytest.raises(ValueError, match="non-empty"):
        ChatTemplate("")
    # trim_blocks / lstrip_blocks, as Hugging Face renders templates
    src = "{% for m in messages %}\n  {% if true %}\n[{{ m.role }}]\n  {% endif %}\n{% endfor %}"
    assert ChatTemplate(src).render([USER, USER]) == "[user]\n[user]\n"


def test_gemma_prompt_matches_golden_ids(real_model_path, golden):
    # the golden chat prompt was the Gemma format without BOS, tokenized with add_special=True
    with GGUFFile(real_model_path) as f:
        md = dict(f.metadata)
    tok = Tokenizer.from_metadata(md)
    t = chat_template_from_metadata(md)
    assert t.name == "gemma" and t.adds_bos
    case = next(c for c in golden["greedy"] if c["prompt"].startswith("<start_of_turn>"))
    text = t.render([{"role": "user", "content": "Write a haiku about the ocean."}])
    assert text == "<bos>" + case["prompt"]
    assert tok.encode(text, add_special=False) == case["prompt_ids"]
