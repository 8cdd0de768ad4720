"""scripts/make_golden.py without a server: the inputs it takes from a stored golden, and the
comparison that proves a rerun reproduces one."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from tests.conftest import GOLDEN_DIR, REPO_ROOT

spec = importlib.util.spec_from_file_location("make_golden", REPO_ROOT / "scripts/make_golden.py")
make_golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_golden)


GOLDENS = ["gemma3-270m-q4_k_m.json", "smollm2-135m-instruct-q4_1.json"]


@pytest.fixture(scope="module", params=GOLDENS)
def stored(request) -> dict:
    return json.loads((GOLDEN_DIR / request.param).read_text())


def test_cases_from_a_stored_golden(stored):
    cases = make_golden.cases_from(stored)
    full = "meta" in stored
    assert cases["format"] == ("full" if full else "basic")
    assert len(cases["tokenize"]) * (2 if full else 1) == len(stored["tokenize"])
    assert len(cases["greedy"]) == len(stored["greedy"])
    chats = [c for c in cases["greedy"] if "messages" in c]
    assert len(chats) == (1 if full else 0)  # Gemma's chat prompt is stored as raw text
    if full:
        assert chats[0]["messages"] == stored["greedy"][4]["chat"]["messages"]
        assert cases["tokenize_literal_special"] == [
            c["text"] for c in stored["tokenize_literal_special"]
        ]


def test_cases_file_with_only_inputs():
    chat = [{"role": "user", "content": "hi"}]
    greedy = [{"prompt": "x"}, {"messages": chat}]
    cases = make_golden.cases_from({"format": "full", "tokenize": list("aba"), "greedy": greedy})
    assert cases["tokenize"] == ["a", "b"]
    assert cases["greedy"] == [{"prompt": "x", "kind": "raw"}, {"messages": chat, "kind": "chat"}]


def test_compare_finds_what_matters(stored):
    assert make_golden.compare(stored, stored) == []
    changed = copy.deepcopy(stored)
    changed["tokenize"][3]["ids"][-1] += 1
    changed["greedy"][1]["output_ids"][5] += 1
    changed["greedy"][2]["steps"][0]["top"][0]["logprob"] += 0.01  # reported, not a difference
    problems = make_golden.compare(changed, stored)
    assert len(problems) == 2, problems
    assert "ids" in problems[0] and "output_ids" in problems[1]
