"""Every architecture's twin on llcuda's CPU path against Hugging Face transformers' fp32 (the
exactness oracle, issue 17).

tests/data/oracle/<twin>.json holds transformers' teacher-forced top-20 log-probabilities for a
fixed 64-token sequence through the twin, made by scripts/make_oracle.py (which writes down each
correction it applies where transformers' GGUF loader departs from llama.cpp). Here the twin is
regenerated from its seed, checked byte for byte by sha256, and run through llcuda. The oracle
was itself checked against llama.cpp (make_oracle.py --llama-server; the distances are in each
data file): on unquantized copies of the twins they agree to 2.4e-5 nats (1.3e-3 for Gemma).

Both sides compute in fp32 from the same dequantized weights, so they agree to float rounding:
the bounds (2e-2 nats over the oracle's top-20 at every position; the same argmax wherever the
oracle's top-2 differ by more than 1e-2) leave room for summation order only. A wrong rope style,
scale, mask, soft-cap or norm moves log-probs by tenths of a nat or more.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.twins import TWINS, sha256_file, write_twin
from llcuda.models.registry import build_model
from tests.models.forward_helpers import open_gemma, sequence_logits

ORACLE_DIR = Path(__file__).resolve().parent.parent / "data" / "oracle"
LOGPROB_TOL = 2e-2
ARGMAX_GAP = 1e-2


def load_oracle(twin: str) -> dict:
    path = ORACLE_DIR / f"{twin}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/make_oracle.py --twin {twin}")
    return json.loads(path.read_text())


def compare_to_oracle(logprobs: torch.Tensor, oracle: dict) -> tuple[float, list[int]]:
    """logprobs [num_tokens, vocab] -> (max |ours - oracle| over the oracle's top-20 at every
    position, positions whose argmax differs where the oracle's top-2 gap exceeds ARGMAX_GAP)."""
    top_ids = torch.tensor(oracle["top_ids"])  # [num_tokens, 20]
    top_lp = torch.tensor(oracle["top_logprobs"], dtype=torch.float32)
    assert logprobs.shape[0] == top_ids.shape[0]
    ours = torch.gather(logprobs, 1, top_ids)
    max_diff = (ours - top_lp).abs().max().item()
    gaps = top_lp[:, 0] - top_lp[:, 1]
    argmax = logprobs.argmax(dim=-1)
    wrong = [p for p in range(len(gaps)) if gaps[p] > ARGMAX_GAP and argmax[p] != top_ids[p, 0]]
    return max_diff, wrong


@pytest.mark.parametrize("twin", list(TWINS))
def test_twin_matches_transformers(twin, tmp_path):
    oracle = load_oracle(twin)
    spec = json.loads(json.dumps(TWINS[twin].as_dict()))  # tuples as JSON lists
    assert oracle["spec"] == spec, f"the {twin} spec changed: rerun scripts/make_oracle.py"
    path = write_twin(tmp_path / f"{twin}.gguf", twin, oracle["seed"])
    assert sha256_file(path) == oracle["sha256"], (
        f"the regenerated {twin} twin differs from the one the oracle ran on: rerun "
        f"scripts/make_oracle.py --twin {twin}"
    )
    ids = oracle["token_ids"]
    gguf, model = open_gemma(path, "cpu")
    try:
        logits = sequence_logits(model, ids, list(range(len(ids))), chunk=24, block_size=16)
    finally:
        gguf.close()
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_tokens, vocab]
    max_diff, wrong = compare_to_oracle(logprobs, oracle)
    assert max_diff <= LOGPROB_TOL, f"{twin}: max |log-prob - transformers| = {max_diff:.3g}"
    assert not wrong, f"{twin}: argmax differs from transformers at positions {wrong}"


def test_comparison_catches_a_wrong_model():
    """The bounds reject a model off by a few tenths of a nat (a miss, not float noise)."""
    oracle = load_oracle("gemma3")
    top_ids = torch.tensor(oracle["top_ids"])
    vocab = TWINS["gemma3"].vocab_size
    exact = torch.full((len(top_ids), vocab), -30.0)
    exact.scatter_(1, top_ids, torch.tensor(oracle["top_logprobs"]))
    assert compare_to_oracle(exact, oracle) == (0.0, [])
    shifted = exact.clone()
    shifted.scatter_add_(1, top_ids[:, :1], torch.full((len(top_ids), 1), -0.3))
    max_diff, wrong = compare_to_oracle(shifted, oracle)
    assert max_diff == pytest.approx(0.3, abs=1e-5)
    assert wrong  # some top-1 falls below its runner-up


# Mistakes a decoder could make, each measured at 0.8 to 4.6 nats from the oracle (gemma3 twin).
MISTAKES = {
    "no sliding window": dict(sliding_window=0, sliding_window_layers=()),
    "global rope base on local layers": dict(rope_theta_local=1e6),
    "transformers' default attention scale 1/sqrt(256)": dict(attention_scale=1 / 16),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_oracle_rejects_a_wrong_gemma3(mistake, tmp_path):
    oracle = load_oracle("gemma3")
    path = write_twin(tmp_path / "gemma3.gguf", "gemma3", oracle["seed"])
    cpu = torch.device("cpu")
    with GGUFFile(path) as g:
        config = dataclasses.replace(model_config_from_gguf(g), **MISTAKES[mistake])
        model = build_model(g, config, [cpu] * config.num_layers, cpu, max_positions=4096)
        ids = oracle["token_ids"]
        logits = sequence_logits(model, ids, list(range(len(ids))))
    max_diff, wrong = compare_to_oracle(torch.log_softmax(logits.float(), dim=-1), oracle)
    assert max_diff > 20 * LOGPROB_TOL and wrong, (mistake, max_diff)
