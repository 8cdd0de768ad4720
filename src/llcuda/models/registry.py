"""Which model class serves which `general.architecture`: every supported one runs on the shared
decoder, its differences read into ModelConfig by gguf/model_config.py."""

from __future__ import annotations

import torch

from llcuda.config import ModelConfig
from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES
from llcuda.gguf.reader import GGUFFile, UnsupportedModelError
from llcuda.models.decoder import DecoderForCausalLM

MODELS = dict.fromkeys(SUPPORTED_ARCHITECTURES, DecoderForCausalLM)


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
        raise UnsupportedModelError(
            f"{gguf.path}: architecture {config.architecture!r} has no model implementation "
            f"(supported: {', '.join(sorted(MODELS))})"
        )
    return cls(gguf, config, block_devices, head_device, max_positions, flash_attn, progress)
