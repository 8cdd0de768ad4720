"""Open a GGUF file and assemble everything that serves it: model, KV cache, tokenizer, engine."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.llm_engine import LLMEngine
from llcuda.engine.memory_plan import (
    MemoryPlan,
    check_fits,
    check_host_memory,
    plan_gpu_memory,
    use_expandable_segments,
    warn_beyond_trained_context,
    weight_bytes_on,
)
from llcuda.engine.warmup import warm_up
from llcuda.gguf.chat_template import ChatTemplate, chat_template_from_metadata
from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES, model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.tensor_shapes import check_tensor_shapes
from llcuda.gguf.tokenizer import Tokenizer
from llcuda.kernels import quant_cpu_native
from llcuda.kernels.dequant_ref import SUPPORTED_TYPES
from llcuda.layers.weight_staging import staging_scope
from llcuda.models.registry import build_model
from llcuda.runner.model_runner import ModelRunner


@dataclass
class LoadedModel:
    llm_engine: LLMEngine
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    model_config: ModelConfig
    engine_config: EngineConfig
    device: str
    gguf: GGUFFile
    memory: dict[str, int] = field(default_factory=dict)  # bytes: weights, kv_cache, ...

    def close(self) -> None:
        shutdown = getattr(self.llm_engine.model_runner, "shutdown", None)
        if shutdown is not None:  # a tensor-parallel runner's worker processes
            shutdown()
        self.gguf.close()


def choose_devices(
    config: EngineConfig, num_layers: int
) -> tuple[list[torch.device], torch.device]:
    """Devices of the blocks and of the head, as llama.cpp's -ngl places them.

    The last `gpu_layers` blocks go to the GPU; the output head too when gpu_layers > num_layers.
    Without CUDA (or with device='cpu' or gpu_layers=0) everything runs on the CPU.
    """
    cpu = torch.device("cpu")
    wanted = config.device
    if wanted is None:
        wanted = "cuda" if torch.cuda.is_available() and config.gpu_layers > 0 else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={wanted!r} was asked for but CUDA is not available")
    gpu = torch.device(wanted)
    if gpu.type == "cpu":
        return [cpu] * num_layers, cpu
    first_gpu_layer = max(num_layers - config.gpu_layers, 0)
    blocks = [gpu if i >= first_gpu_layer else cpu for i in range(num_layers)]
    head = gpu if config.gpu_layers > num_layers else cpu
    return blocks, head


def load(
    model_path: str,
    config: EngineConfig,
    verbose: bool = True,
    chat_template: str | None = None,
) -> LoadedModel:
    gguf = GGUFFile(model_path)
    runner = None
    try:
        # refuse a bad file here, naming the key or tensor, not at the first request
        model_config = model_config_from_gguf(gguf)
        gguf.check_supported(SUPPORTED_ARCHITECTURES, SUPPORTED_TYPES)
        check_tensor_shapes(gguf, model_config)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        template = chat_template_from_metadata(gguf.metadata, override=chat_template)
        warn_beyond_trained_context(model_config, config)
        progress = _progress_bar(verbose, model_config.num_layers + 1, model_path)
        update = progress.update if progress is not None else None
        plan = None
        if config.tensor_parallel_size > 1:  # every layer split over processes: llcuda/parallel
            from llcuda.parallel.launch import start_tensor_parallel

            runner = start_tensor_parallel(gguf, model_config, config, update)
            block_devices, head_device = runner.model.block_devices, runner.device
        else:
            block_devices, head_device = choose_devices(config, model_config.num_layers)
            plan = _check_gpu_memory(gguf, model_config, config, block_devices, head_device)
            check_host_memory(gguf.tensors, model_config, config, block_devices, head_device)
            if any(d.type == "cpu" for d in [*block_devices, head_device]):
                _prepare_cpu_kernels(config, verbose)
            # repacking's temporaries come from a pool released after the build
            with staging_scope(_first_gpu(block_devices, head_device)):
                model = build_model(
                    gguf,
                    model_config,
                    block_devices,
                    head_device,
                    max_positions=config.ctx_size,
                    flash_attn=config.flash_attn,
                    progress=update,
                )
            kv_dtype = torch.float16 if head_device.type == "cuda" else torch.float32
            runner = ModelRunner(model, model_config, config, kv_cache_dtype=kv_dtype)
        if progress is not None:
            progress.close()
        engine = LLMEngine(runner, tokenizer, config)
        if head_device.type == "cuda" and config.extra.get("warm_up", True):
            warm_up(engine, model_config.vocab_size)
    except BaseException:
        if runner is not None and hasattr(runner, "shutdown"):
            runner.shutdown()
        gguf.close()
        raise
    memory = {
        "weights": sum(t.nbytes for t in gguf.tensors.values()),
        "kv_cache": runner.kv_cache_bytes,
    }
    if plan is not None:
        memory["gpu_weights"], memory["workspace"] = plan.weights, plan.workspace
    device = str(head_device if head_device.type != "cpu" else block_devices[-1])
    return LoadedModel(engine, tokenizer, template, model_config, config, device, gguf, memory)


def _prepare_cpu_kernels(config: EngineConfig, verbose: bool) -> None:
    """n_threads for the CPU layers, and the CPU fast path built now (once per machine, ~30-50 s
    on 2 cores) rather than inside the first request."""
    n = quant_cpu_native.set_num_threads(config.n_threads)
    if not quant_cpu_native.enabled() or quant_cpu_native.is_loaded():
        return
    built = quant_cpu_native.is_built()
    if verbose and not built:
        print("llcuda: compiling the CPU kernels (once per machine, about a minute)...",
              file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    native = quant_cpu_native.load_native()
    if verbose and not built and native is not None:
        print(f"llcuda: CPU kernels ready in {time.perf_counter() - t0:.0f} s ({n} threads)",
              file=sys.stderr, flush=True)  # fmt: skip


def _first_gpu(block_devices: list[torch.device], head_device: torch.device
               ) -> torch.device | None:  # fmt: skip
    return next((d for d in [*block_devices, head_device] if d.type == "cuda"), None)


def _check_gpu_memory(
    gguf: GGUFFile,
    model_config: ModelConfig,
    config: EngineConfig,
    block_devices: list[torch.device],
    head_device: torch.device,
) -> MemoryPlan | None:
    """The GPU share of the model, checked against the free memory before any allocation."""
    gpu = _first_gpu(block_devices, head_device)
    if gpu is None:
        return None
    use_expandable_segments()  # before the first weight is allocated
    num_gpu_layers = sum(d.type == "cuda" for d in block_devices)
    head_on_gpu = head_device.type == "cuda"
    weight_bytes = weight_bytes_on("cuda", gguf.tensors, model_config, block_devices, head_device)
    plan = plan_gpu_memory(model_config, config, weight_bytes, num_gpu_layers, head_on_gpu)
    free, _total = torch.cuda.mem_get_info(gpu)
    check_fits(plan, free, config, str(gpu))
    return plan


def _progress_bar(verbose: bool, total: int, path: str) -> Any:
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"loading {path.rsplit('/', 1)[-1]}", unit="layer")
