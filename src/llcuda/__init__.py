"""llcuda: run GGUF language models fast on NVIDIA GPUs, in Python you can read."""

__version__ = "0.1.0"

from llcuda.api import InferenceEngine  # noqa: E402
from llcuda.config import EngineConfig  # noqa: E402
from llcuda.sampling_params import SamplingParams  # noqa: E402
from llcuda.streams import InferResult  # noqa: E402

__all__ = ["EngineConfig", "InferResult", "InferenceEngine", "SamplingParams", "__version__"]
