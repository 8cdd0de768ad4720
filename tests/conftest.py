"""Shared fixtures: the real Gemma 3 270M model, llama.cpp's golden data, and the gpu marker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("LLCUDA_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The embedded default model, assembled once from its PyPI chunk packages.
    LLCUDA_TEST_MODEL names the same file elsewhere (the GPU machine has no package index)."""
    import os

    if os.environ.get("LLCUDA_TEST_MODEL"):
        return Path(os.environ["LLCUDA_TEST_MODEL"])
    from llcuda.hub import resolve_model

    return Path(resolve_model("gemma-3-270m-Q4_K_M", verbose=False))


@pytest.fixture(scope="session")
def golden() -> dict:
    path = GOLDEN_DIR / "gemma3-270m-q4_k_m.json"
    if not path.exists():
        pytest.fail(f"golden data missing: {path} (shared/ must lie beside the checkout)")
    return json.loads(path.read_text())
