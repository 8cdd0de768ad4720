"""The real Gemma 3 270M on the CPU path."""

from __future__ import annotations

import pytest

from tests.models.forward_helpers import open_gemma


@pytest.fixture(scope="session")
def gemma_cpu(real_model_path):
    gguf, model = open_gemma(real_model_path, "cpu")
    yield model
    gguf.close()
