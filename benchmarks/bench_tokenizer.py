"""Prompt tokenization time: the SPM one-pass merge against the cached word-piece encoder.

    python benchmarks/bench_tokenizer.py [MODEL]   # default: the embedded Gemma 3 270M

200 prompts of 100 words drawn from README.md's words, each tokenized both ways (same ids
checked); milliseconds per prompt. Runs on the CPU.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.tokenizer import Tokenizer
from llcuda.gguf.tokenizer_spm import spm_tokenize
from llcuda.hub import resolve_model


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else resolve_model("gemma-3-270m-Q4_K_M", verbose=False)
    tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
    words = (Path(__file__).resolve().parents[1] / "README.md").read_text().split()
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(words) for _ in range(100)).replace(" ", "▁")
               for _ in range(200)]
    t = time.perf_counter()
    one_pass = [spm_tokenize(p, tok._token_to_id, tok._scores, tok._byte_to_token) for p in prompts]
    t_one = (time.perf_counter() - t) / len(prompts)
    t = time.perf_counter()
    pieces = [tok._spm(p) for p in prompts]
    t_pieces = (time.perf_counter() - t) / len(prompts)
    assert one_pass == pieces, "the two encoders disagree"
    print(f"one-pass merge {t_one * 1e3:.2f} ms/prompt, cached word pieces {t_pieces * 1e3:.3f} "
          f"ms/prompt ({t_one / t_pieces:.1f}x)")


if __name__ == "__main__":
    main()
