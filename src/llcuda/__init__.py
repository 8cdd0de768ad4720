"""llcuda: run GGUF language models fast on NVIDIA GPUs, in Python you can read."""

__version__ = "0.1.0"
