"""One request's position in its grammar: which tokens may come next, advanced token by token."""

from __future__ import annotations

import threading
from collections import OrderedDict

from llguidance import LLMatcher, LLTokenizer

from llcuda.structured.constraint import StructuredOutput


class GrammarState:
    """An llguidance matcher for one request.

    `accept` advances it by sampled tokens; `is_finished` once the grammar can take nothing but
    EOS (the engine ends the request there: "stop"). EOS is in the mask only where the grammar
    may end, so a constrained request never stops early by EOS.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # bits in its mask: the tokenizer's vocabulary

    def accept(self, token_ids: list[int]) -> bool:
        """Consume `token_ids`; False if one of them broke the grammar (the matcher is then in
        its error state: `error` says why)."""
        return all(self.matcher.consume_token(t) for t in token_ids)

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Makes GrammarStates for one vocabulary, keeping a fresh matcher per grammar.

    llguidance builds its lexer lazily, so a new matcher is cheap (~1 ms on Gemma's vocabulary
    for a 4-property schema); a copy of a kept one skips even that for the common case of many
    requests with one schema. Thread-safe: the engine's check_request runs on callers' threads.
    """

    def __init__(self, tokenizer: LLTokenizer, max_cached: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._cache: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, constraint: StructuredOutput) -> None:
        """ValueError if `constraint`'s grammar cannot be built for this vocabulary; no state is
        made (the matcher is kept for the new_state that follows)."""
        with self._lock:
            self._template(constraint)

    def new_state(self, constraint: StructuredOutput) -> GrammarState:
        """A GrammarState at the start of `constraint`'s grammar; ValueError if the grammar
        cannot be built for this vocabulary."""
        with self._lock:
            matcher = self._template(constraint).deep_copy()
        return GrammarState(matcher, self.tokenizer.vocab_size)

    def _template(self, constraint: StructuredOutput) -> LLMatcher:
        """The kept fresh matcher of `constraint`'s grammar, made if new (self._lock held)."""
        key = constraint.grammar
        template = self._cache.get(key)
        if template is None:
            template = LLMatcher(self.tokenizer, key, log_level=0)
            if template.is_error():
                raise ValueError(f"{constraint.kind} cannot be used: {template.get_error()}")
            self._cache[key] = template
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return template
