"""Structured output and tool calls: constrained decoding with llguidance token bitmasks.

A request's `SamplingParams.structured` (constraint.py) names a JSON schema, any JSON object or a
GBNF grammar, checked when it is made. The engine gives each such request a matcher
(grammar_state.py) over our own GGUF vocabulary (vocabulary.py); before each sampling step the
runner fills the constrained rows' bitmasks on the host, after queueing the forward pass so that
on a GPU the two overlap, and the sampler sets the forbidden logits to -inf on the device
(bitmask.py); free rows in the same batch are untouched. Each accepted token advances the matcher;
EOS is allowed only where the grammar may end, and a request whose grammar is complete ends there.
Constrained requests take single steps (a decode burst samples ahead of the host's matcher);
bursts and CUDA graphs stay for batches without them. Tool calls (tool_calls.py): the formats of
Llama 3.x, Qwen2.5/3 and a generic JSON one, parsed from the output; tool_choice "required" or a
named function forces a call with a grammar.

Why llguidance, not xgrammar (both measured on Gemma 3 270M's 262,144-token vocabulary, this
machine's CPU shared by several jobs, a 4-property schema with nested object, enum array with
escapes, bounded integer and string, 33-token output):

    llguidance 1.9.1: vocabulary 1.0 s, first matcher 1-5 ms (the lexer is built lazily), a
        copy 0.8 ms; mask per token p50 28 us, p90 124 us, max 0.74 ms
    xgrammar 0.2.9:   vocabulary 0.13 s, schema compile 74 ms (builtin JSON 67 ms);
        mask per token p50 3 us, p90 40 us, max 92 us

xgrammar's masks are faster, but it imports transformers at import time (tokenizer_info.py,
contrib/hf.py) and needs apache-tvm-ffi and pydantic; llguidance has no Python dependencies at
all, converts GBNF itself and names the problem in a bad schema or grammar.

A whole step's host work with llguidance, same vocabulary and schema, every row at its own place
in its own document (the loaded 2-core machine): masks 0.16 ms for 1 row, 0.8-1.3 ms for 16,
2.5-5 ms for 64; advancing the matchers by the sampled tokens 0.01 / 0.05 / 0.13 ms. The masks
are filled after the forward pass is queued, so on a GPU they overlap it; the advance is on the
host's path between steps. Not yet measured on the GPU host (benchmarks/bench_structured.py).
"""

from llcuda.structured.constraint import StructuredOutput

__all__ = ["StructuredOutput"]
