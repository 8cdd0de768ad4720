"""Per-request generation knobs (llama.cpp / OpenAI meanings), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llcuda.structured.constraint import StructuredOutput

# llama.cpp's default temperature (common_params_sampling.temp, llama-server's and llama-cli's
# `--temp`): InferenceEngine's methods, `llcuda generate` and the server's /completion use it
DEFAULT_TEMPERATURE = 0.8

# The most top alternatives a request may ask log-probs for: OpenAI takes 20 (top_logprobs);
# llama-server's n_probs takes any count, but each one costs a wider top-k on the device and
# more bytes per token to the host, so a sane bound is kept (runner/logprobs.py)
MAX_LOGPROBS = 100


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops.

    Every field's type is checked (bool must be a bool, numbers finite, ...): a ValueError names
    the field. temperature 0 is greedy. top_k <= 0 disables top-k; top_p 1.0 and min_p 0.0
    disable theirs.
    logprobs: None (the default) reports none; N >= 0 reports each sampled token's log-prob and
    its N most likely alternatives (0: the chosen token's only), from the model's raw
    distribution (see llcuda.runner.logprobs for which distribution and why).
    repeat_penalty 1.0 is off; it applies to the last `repeat_last_n` tokens (prompt included),
    dividing positive logits and multiplying negative ones, as llama.cpp does.
    """

    max_tokens: int = 128
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # structured output: the output must match this JSON schema / grammar (llcuda.structured)
    structured: StructuredOutput | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        _number("temperature", self.temperature, 0.0)
        _number("top_p", self.top_p, 0.0, 1.0)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("repeat_penalty", self.repeat_penalty, 0.0)
        _integer("max_tokens", self.max_tokens, 0)
        _integer("top_k", self.top_k, None)
        _integer("repeat_last_n", self.repeat_last_n, -1)
        if self.seed is not None:
            _integer("seed", self.seed, None)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be <= {MAX_LOGPROBS} (top alternatives per token), "
                    f"got {self.logprobs}"
                )
        self._check_structured()

    def _check_structured(self) -> None:
        if self.structured is None:
            return
        from llcuda.structured.constraint import StructuredOutput

        if not isinstance(self.structured, StructuredOutput):
            raise ValueError(
                f"structured must be a llcuda.structured.StructuredOutput, got "
                f"{type(self.structured).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _number(name: str, value: object, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _integer(name: str, value: object, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
