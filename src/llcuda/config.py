"""Static settings: the model's shape (from GGUF metadata) and the engine's knobs.

`ModelConfig` is read from a GGUF file by `llcuda.gguf.model_config.model_config_from_gguf`.
`EngineConfig` carries the llama.cpp-style knobs users pass to `load_model` and validates them,
naming the argument in every error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape and math of a decoder-only transformer, as llama.cpp reads it from GGUF metadata."""

    architecture: str  # general.architecture, e.g. "gemma3"
    name: str  # general.name (informational)
    vocab_size: int
    hidden_size: int  # n_embd
    intermediate_size: int  # n_ff
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # attention.key_length (== value_length for supported models)
    rms_norm_eps: float
    max_position_embeddings: int  # context_length the model was trained for
    rope_theta: float  # global layers
    rope_theta_local: float  # sliding-window layers (Gemma 3: rope.freq_base_swa or 10000)
    rope_scaling_factor: float = 1.0  # linear scaling on global layers (freq_scale = 1/factor)
    rope_dim: int = 0  # rope.dimension_count; 0 means head_dim
    sliding_window: int = 0  # 0: no sliding-window layers
    # one bool per layer: True where the layer attends only to the last `sliding_window` positions
    sliding_window_layers: tuple[bool, ...] = ()
    attention_scale: float = 0.0  # multiplier applied to q; 0 means 1/sqrt(head_dim)
    final_logit_softcapping: float = 0.0  # 0: off
    embedding_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    tie_word_embeddings: bool = True  # no `output.weight`: the LM head is token_embd
    # How the shared decoder (models/decoder.py) computes a block; each architecture's reader in
    # gguf/model_config.py sets these from what llama.cpp does for that family.
    rope_neox: bool = True  # False: llama.cpp's NORM rope on adjacent pairs (`llama` files)
    hidden_act: str = "silu"  # the gated FFN: "silu" (SwiGLU) or "gelu_tanh" (GEGLU)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Gemma 3, Qwen 3)
    post_norms: bool = False  # Gemma's RMSNorm of the attention and FFN outputs before the add
    attn_logit_softcapping: float = 0.0  # Gemma 2: scores = c * tanh(scores / c); 0: off
    # RoPE frequency factors (theta_i / factor_i): a tensor name, "" for none. Llama 3 files carry
    # `rope_freqs.weight`; Phi-3 LongRoPE files `rope_factors_short/long.weight`, the long ones
    # taken when a sequence's context exceeds the trained `rope_original_context` (llama.cpp).
    rope_freq_factors: str = ""
    rope_long_factors: str = ""
    rope_original_context: int = 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window_layers) and self.sliding_window_layers[layer]

    def rope_factors_for(self, ctx_size: int) -> str:
        """The frequency-factor tensor RoPE uses at a per-sequence context of ctx_size, or ""."""
        if self.rope_long_factors and ctx_size > self.rope_original_context:
            return self.rope_long_factors
        return self.rope_freq_factors


# llama-server resolves `-np -1` (its default) to 4 slots over one unified KV buffer
# ("n_parallel is set to auto, using n_parallel = 4 and kv_unified = true")
AUTO_N_PARALLEL = 4
AUTO_N_PARALLEL_FLAG = -1  # llama.cpp's spelling of "auto"; None means the same


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass
class EngineConfig:
    """The knobs of `InferenceEngine.load_model`, with llama.cpp's meanings.

    - ctx_size: the most tokens (prompt + generated) one sequence holds (llama.cpp `-c` per slot).
    - batch_size: token budget of one engine step, summed over all sequences (`-b`).
    - ubatch_size: the most prompt tokens one sequence feeds in one step (chunked prefill, `-ub`).
    - n_parallel: the most sequences decoded together (`-np`). None (or -1) = automatic, as
      llama-server's default `-np -1`: AUTO_N_PARALLEL (4) sequences sharing one unified KV
      pool (llama.cpp's `--kv-unified`) of ctx_size tokens, so that concurrent requests batch
      out of the box while the KV memory stays that of one full context. Each sequence may
      still grow to ctx_size alone; when several long ones fill the pool, the scheduler
      preempts the newest (it recomputes later). An explicit integer gives that many slots
      and, unless cache_size says otherwise, ctx_size * n_parallel tokens of cache.
    - cache_size: KV-cache capacity in tokens over all sequences; None = ctx_size with an
      automatic n_parallel, ctx_size * n_parallel with an explicit one.
    - gpu_layers: layers placed on the GPU (99 = all); the rest run on the CPU.
    - flash_attn: None = auto, True/False forces the fused attention kernel on or off.
    - enable_prefix_caching: requests whose prompts share a prefix reuse its full KV blocks instead
      of computing them again (vLLM's --enable-prefix-caching; llama-server's prompt cache). The
      old spelling `extra={"enable_prefix_caching": ...}` is still read.
    - num_scheduler_steps: decode steps run back to back per scheduling round while every running
      sequence is decoding and no waiting request can be admitted (vLLM's multi-step scheduling):
      each step's sampled tokens feed the next on the GPU, and the host, which builds and reads
      one step in about half a millisecond, stays off the GPU's path. Tokens then arrive in
      bursts; a sequence that stops inside a burst drops the tokens after its stop. None = 16 on
      a GPU with CUDA graphs, 1 (no bursts) otherwise.
    - swa_full: keep the sliding-window layers' cache at full size (llama.cpp `--swa-full`).
      By default those layers keep only the blocks their window can still see, in a pool of
      their own (engine/kv_cache_manager.py): a fraction of the memory at long contexts.
    - tensor_parallel_size: ranks that split every layer (vLLM's -tp): one process each, the
      scheduler in this one (llcuda/parallel/). 1 = no tensor parallelism.
    - n_threads: CPU threads for the matmuls (llama.cpp `-t`); None = one per physical core.
    - extra: switches for measuring the engine against itself, all on by default on one GPU:
      "cuda_graphs" (graphs of decode steps and single-sequence prompt chunks), "prefill_graphs"
      (the latter only; runner/cuda_graphs.py), "warm_up" (the compile workload after load);
      and "tp_timeout_s", the longest a tensor-parallel start-up or collective may wait for a
      rank before it is an error (default 600).
    """

    gpu_layers: int = 99
    ctx_size: int = 2048
    batch_size: int = 512
    ubatch_size: int = 128
    n_parallel: int | None = None  # None / -1: automatic (resolved in __post_init__)
    cache_size: int | None = None
    flash_attn: bool | None = None
    block_size: int = 32  # tokens per KV-cache block
    device: str | None = None  # None: cuda if available and gpu_layers > 0, else cpu
    seed: int | None = None
    enable_prefix_caching: bool = True
    num_scheduler_steps: int | None = None
    swa_full: bool = False
    tensor_parallel_size: int = 1
    n_threads: int | None = None  # None: one per physical core
    extra: dict = field(default_factory=dict)
    # True when n_parallel was automatic (it then holds AUTO_N_PARALLEL)
    n_parallel_auto: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.n_parallel is None or self.n_parallel == AUTO_N_PARALLEL_FLAG:
            self.n_parallel, self.n_parallel_auto = AUTO_N_PARALLEL, True
            if self.cache_size is None:  # one unified pool: no more KV memory than one slot's
                _check_int("ctx_size", self.ctx_size, 8)
                self.cache_size = self.ctx_size
        _check_int("gpu_layers", self.gpu_layers, 0)
        _check_int("ctx_size", self.ctx_size, 8)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("ubatch_size", self.ubatch_size, 1)
        if isinstance(self.n_parallel, int) and not isinstance(self.n_parallel, bool):
            if self.n_parallel < 1:
                raise ValueError(
                    f"n_parallel must be >= 1, or None / -1 for automatic, got {self.n_parallel}"
                )
        _check_int("n_parallel", self.n_parallel, 1)
        _check_int("block_size", self.block_size, 1)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.num_scheduler_steps is not None:
            _check_int("num_scheduler_steps", self.num_scheduler_steps, 1)
        if self.ubatch_size > self.batch_size:
            raise ValueError(
                f"ubatch_size ({self.ubatch_size}) must not exceed batch_size ({self.batch_size})"
            )
        if self.cache_size is not None:
            _check_int("cache_size", self.cache_size, 1)
            if self.cache_size < self.ctx_size:
                raise ValueError(
                    f"cache_size ({self.cache_size}) must hold at least one full context "
                    f"(ctx_size={self.ctx_size})"
                )
        if self.flash_attn is not None and not isinstance(self.flash_attn, bool):
            raise ValueError(f"flash_attn must be None, True or False, got {self.flash_attn!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.n_threads is not None:
            _check_int("n_threads", self.n_threads, 1)
        if not isinstance(self.swa_full, bool):
            raise ValueError(f"swa_full must be True or False, got {self.swa_full!r}")
        if "enable_prefix_caching" in self.extra:  # where the flag lived before it was a field
            self.extra = dict(self.extra)
            self.enable_prefix_caching = self.extra.pop("enable_prefix_caching")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}"
            )

    @property
    def num_cache_tokens(self) -> int:
        return self.cache_size if self.cache_size is not None else self.ctx_size * self.n_parallel

    @property
    def num_blocks(self) -> int:
        return -(-self.num_cache_tokens // self.block_size)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.ctx_size // self.block_size)
