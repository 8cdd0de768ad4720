"""The CPU fast path: a small C++ extension (csrc/quant_cpu.cpp) for the quantized matmuls.

`quant_matmul_native(x, w)` is `x @ dequantize_ref(w).T` with each weight block decoded in
registers (AVX-512 or AVX2 byte ops, then FMAs with fp32 x), the weight never leaving its GGUF
blocks: the same values as the reference up to fp32 summation order, so the golden tests keep
their bounds and a token's output does not depend on the batch it came in. Prompts (from
MKL_TOKENS tokens through dequant_matmul) and the LM head always keep x in fp32.

`int8_x=True` is llama.cpp's form: x quantized to int8 per group of 32 (exactly
q8_activations.quantize_q8_ref, the GPU decode GEMV's spec) and integer dot products, which
skip widening the weights to floats: 1.2-1.6x per one-token GEMV on AVX2. A decode step's
decoder blocks take it (decode_block_cpu; LLCUDA_CPU_INT8=0 turns it off), as the GPU's decode
GEMVs do: an earlier trial that quantized every matmul moved a golden near-tie by 0.9 nats and
made chunked prefill differ from one pass by 0.7 in the logits, which a decode step alone
cannot (prefill and the head stay fp32; a decode token's sums do not depend on its batch).
`quant_matmul_cpu` (exact decode + MKL) and `dequantize_ref` stay beside it as the
specification and the fallback.

The extension is compiled on first use with `-march=native` into `~/.cache/llcuda/ext` (beside
`$LLCUDA_CACHE` when that is set), once per source and torch version: 30-75 s on the shared
2-core dev box (torch's headers dominate), then ~0.1 s to load. Without a compiler, or if the
build fails, one warning is printed and the pure-torch path runs; `LLCUDA_NATIVE_CPU=0` turns
it off. Threads: the extension's own pool (Pool in the source: OpenMP's fixed shares and
spinning joins lose 4x on a shared 2-core machine), sized with torch's by `set_num_threads`
(the engine's `n_threads`).

Measured on the shared 2-core AMD EPYC (Zen 4) dev box, 1 thread, best of 7, load average ~1
(so only the ratios mean much): the 262144 x 640 Q8_0 LM head at one token 10.6 ms (17 GB/s)
against 61 ms for quant_matmul_cpu; a 2048 x 640 Q5_0 GEMV 0.11 ms (vs ~1.7 ms), 640 x 2048 Q6_K
0.11 ms (vs ~1.2 ms); 64 tokens through the Q5_0 one 3.1 ms (27 GMAC/s; quant_matmul_cpu 3.2
ms); 256 tokens 14.3 ms against 9.7 ms for quant_matmul_cpu (a prompt's many tokens now take
dequant_matmul: the extension's own decode into fp32 tiles, then MKL; see MKL_TOKENS). The
engine-level numbers against llama.cpp are in BENCHMARKS.md (CPU). The same extension runs a
decode step's whole decoder blocks (csrc/decode_block.h, through kernels/decode_block_cpu.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels import iq_tables
from llcuda.kernels.iq_tables import IQ4_KVALUES, MXFP4_KVALUES
from llcuda.kernels.quant_matmul_cpu import TILE_ELEMS, scratch_buffer, torch_threads
from llcuda.layers.quant_tensor import QuantTensor

NATIVE_TYPES: frozenset[GGMLType] = frozenset({
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
    GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
    GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ1_S, GGMLType.IQ1_M,
    GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.MXFP4,
})  # fmt: skip

# From this many tokens on, decoding a tile of the weight to fp32 once (the extension's
# `dequantize`) and multiplying it by MKL (dequant_matmul) beats this kernel, which redoes the
# decode for every 4 tokens. 2 threads, 4096 x 2048, ms at 16 / 64 / 512 tokens, this kernel ->
# dequant_matmul: Q4_K 4.7 / 19.7 / 181 -> 4.3 / 8.8 / 69, Q8_0 3.8 / 14.8 / 162 -> 4.0 / 8.6 /
# 56, IQ2_XS 12.3 / 49.6 / 430 -> 4.9 / 9.3 / 53; the torch-decoded quant_matmul_cpu took 20.7 /
# 26.2 / 70 (Q4_K), 51.6 / 65.0 / 103 (IQ2_XS).
MKL_TOKENS = 16

# the grids set_iq_grids takes, in its order (IQ1_M reads IQ1_S's)
_GRID_ORDER = (GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS,
               GGMLType.IQ3_S, GGMLType.IQ1_S)  # fmt: skip
_SOURCE = Path(__file__).parent / "csrc" / "quant_cpu.cpp"
_HEADERS = (Path(__file__).parent / "csrc" / "decode_block.h",)  # included by _SOURCE
# The compiler flags; the IQ4 and MXFP4 code books come from iq_tables, their one source.
_CFLAGS = [
    "-O3", "-march=native", f"-DLLCUDA_IQ4_KVALUES={','.join(map(str, IQ4_KVALUES))}",
    f"-DLLCUDA_MXFP4_KVALUES={','.join(map(str, MXFP4_KVALUES))}",
]  # fmt: skip
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the loaded extension or None once a build failed


def _switch(name: str) -> bool:
    """An on-by-default environment switch: off for 0 / false / no / off."""
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


def enabled() -> bool:
    return _switch("LLCUDA_NATIVE_CPU")


def decode_int8() -> bool:
    """Whether a CPU decode step's decoder-block GEMVs quantize their activations to int8
    (LLCUDA_CPU_INT8, default on; 0 keeps them fp32, exact to the reference's rounding)."""
    return _switch("LLCUDA_CPU_INT8")


def build_dir() -> Path:
    """Where the extension is built: beside the model cache, keyed by source, flags and torch."""
    models = os.environ.get("LLCUDA_CACHE")
    root = Path(models).expanduser().parent if models else Path.home() / ".cache" / "llcuda"
    text = b"".join(path.read_bytes() for path in (_SOURCE, *_HEADERS))
    text += " ".join(_CFLAGS).encode() + _cpu_features().encode()
    key = hashlib.sha256(text + torch.__version__.encode()).hexdigest()[:12]
    return root / "ext" / f"quant_cpu-{key}"


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's feature flags (/proc/cpuinfo on Linux), so a
    cache shared by machines of several kinds (a home directory on NFS) never hands an AVX-512
    build to a CPU without it, which would die of an illegal instruction."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def is_loaded() -> bool:
    """load_native has run (successfully or not) in this process."""
    return "module" in _state


def is_built() -> bool:
    """The extension's shared library is in the build directory (loading it is fast)."""
    return any(build_dir().glob("llcuda_quant_cpu*.so"))


def load_native() -> ModuleType | None:
    """The compiled extension, built on first call; None (after one warning) where it can't be."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            native = _build()
            if native is not None:
                native.set_num_threads(int(_state.get("threads", torch.get_num_threads())))
                native.set_iq_grids(
                    *(iq_tables.grid(t).contiguous() for t in _GRID_ORDER),
                    iq_tables.ksigns().contiguous(),
                )
            _state["module"] = native
    return _state["module"]  # type: ignore[return-value]


def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return load(
            name="llcuda_quant_cpu",
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the torch path still runs
        warnings.warn(
            f"llcuda: the CPU fast path could not be built ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); running the "
            "slower pure-torch CPU kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def physical_cores() -> int:
    """Cores this process may run on, one per physical core (SMT siblings counted once)."""
    cpus = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_num_threads(n: int | None) -> int:
    """Threads for the CPU path (torch's intra-op pool and the extension's); None: one per
    physical core, as llama.cpp's default. Returns the count set."""
    if n is None:
        n = physical_cores()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_threads must be a positive integer or None, got {n!r}")
    torch.set_num_threads(n)
    _state["threads"] = n
    native = _state.get("module")
    if native is not None:
        native.set_num_threads(n)  # type: ignore[attr-defined]
    return n


def torch_ops_on_one_thread() -> contextlib.AbstractContextManager[None]:
    """Run a CPU step's torch ops on the calling thread alone while the extension's pool does
    the matmuls with n_threads. The step's other ops are small (a decode's softmax over [4, 1,
    n], a cache gather of 64k elements) yet several enter torch's OpenMP pool, and on a shared
    machine each of those joins waits for a descheduled thread: a decode step measured 2 tok/s
    with torch on 2 threads against 34 with 1 (load average ~4 on the 2-core box). Without the
    extension nothing changes (the torch path's prefill GEMMs want the threads)."""
    if _state.get("module") is None or not enabled():
        return contextlib.nullcontext()
    return torch_threads(1)


def supports(weight: QuantTensor) -> bool:
    return (
        weight.qtype in NATIVE_TYPES
        and weight.device.type == "cpu"
        and weight.shape[1] % QUANT_SIZES[weight.qtype][0] == 0
    )


def quant_matmul_native(
    x: torch.Tensor, weight: QuantTensor, int8_x: bool = False
) -> torch.Tensor | None:
    """x @ dequantize(weight).T; None where the fast path can't run it (extension unavailable
    or disabled, unsupported type, a tensor off the CPU). From MKL_TOKENS tokens on it runs
    dequant_matmul on n_threads instead. int8_x: quantize_q8_ref(x) @ dequantize(weight).T
    (integer dot products, at any number of tokens).

    x: [num_tokens, in_features] -> [num_tokens, out_features] float32.
    """
    if not (enabled() and supports(weight) and x.device.type == "cpu"):
        return None
    n_rows, n_cols = weight.shape
    if x.dim() != 2 or x.shape[1] != n_cols:
        raise ValueError(
            f"x must be [num_tokens, {n_cols}] for weight {weight.shape}, got {tuple(x.shape)}"
        )
    native = load_native()
    if native is None:
        return None
    if x.shape[0] >= MKL_TOKENS and not int8_x:
        # a CPU step runs torch on one thread (torch_ops_on_one_thread); this GEMM wants them all
        with torch_threads(int(_state.get("threads", torch.get_num_threads()))):
            return dequant_matmul(native, x.float(), weight)
    out = torch.empty(x.shape[0], n_rows, dtype=torch.float32)
    native.quant_matmul(x.float().contiguous(), weight.data, int(weight.qtype), out, int8_x)
    return out


def dequant_matmul(native: ModuleType, x: torch.Tensor, weight: QuantTensor) -> torch.Tensor:
    """x @ dequantize(weight).T for a prompt's many tokens: the extension decodes the weight a
    tile of about TILE_ELEMS elements at a time (`dequantize`, the matmuls' own decoders), and
    each tile is one MKL GEMM, so no fp32 copy of the whole matrix exists.

    x: float32 [num_tokens, in_features] -> [num_tokens, out_features] float32."""
    n_rows, n_cols = weight.shape
    rows_per_tile = max(1, min(n_rows, TILE_ELEMS // n_cols))
    tile = scratch_buffer("dequant_tile", (rows_per_tile, n_cols), torch.float32)
    out_t = torch.empty(n_rows, x.shape[0], dtype=torch.float32)  # [out, tokens]: row slices
    x = x.contiguous()
    for start in range(0, n_rows, rows_per_tile):
        stop = min(start + rows_per_tile, n_rows)
        part = tile[: stop - start]
        native.dequantize(weight.data[start:stop], int(weight.qtype), part)
        torch.mm(part, x.T, out=out_t[start:stop])
    return out_t.T.contiguous()
