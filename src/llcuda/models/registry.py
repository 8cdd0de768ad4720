"""Which model class serves which `general.architecture`."""

from __future__ import annotations

import torch

from llcuda.config import ModelConfig
from llcuda.gguf.reader import GGUFFile
from llcuda.models.gemma3 import Gemma3ForCausalLM

MODELS = {"gemma3": Gemma3ForCausalLM}


def build_model(
    gguf: GGUFFile,
    config: ModelConfig,
    block_devices: list[torch.device],
    head_device: torch.device,
    max_positions: int,
    flash_attn: bool | None = None,
    progress=None,
):
    cls = MODELS.get(config.architecture)
    if cls is None:
        raise ValueError(
            f"{gguf.path}: architecture {config.architecture!r} has no model implementation yet "
            f"(supported: {', '.join(sorted(MODELS))})"
        )
    return cls(gguf, config, block_devices, head_device, max_positions, flash_attn, progress)
