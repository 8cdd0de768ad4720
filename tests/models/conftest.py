"""The real Gemma 3 270M on the CPU path."""

from __future__ import annotations

import pytest
import torch

from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.models.registry import build_model


@pytest.fixture(scope="session")
def gemma_cpu(real_model_path):
    gguf = GGUFFile(real_model_path)
    config = model_config_from_gguf(gguf)
    cpu = torch.device("cpu")
    model = build_model(gguf, config, [cpu] * config.num_layers, cpu, max_positions=4096)
    yield model
    gguf.close()
