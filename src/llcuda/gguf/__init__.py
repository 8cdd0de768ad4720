"""GGUF files: reader, type table, model config, tokenizers."""

from llcuda.gguf.constants import QUANT_SIZES, GGMLType, GGUFValueType
from llcuda.gguf.reader import GGUFError, GGUFFile, GGUFTensorInfo, UnsupportedModelError

__all__ = [
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFTensorInfo",
    "GGUFValueType",
    "QUANT_SIZES",
    "UnsupportedModelError",
]
