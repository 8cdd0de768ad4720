"""The one decoder every supported architecture runs on, computed as llama.cpp computes it.

Per block (src/models/{llama,qwen2,qwen3,phi3,gemma2,gemma3}.cpp):
    h = RMSNorm(x) * attn_norm
    q|k|v = h @ W (+ bias, Qwen 2)         -> per-head q/k RMSNorm (Gemma 3, Qwen 3)
    RoPE (NEOX, or NORM on adjacent pairs for `llama`) -> paged attention, scaled q, soft-capped
    scores (Gemma 2), sliding window on local layers -> o = attn @ W_o
    x += RMSNorm(o) * post_attention_norm  (Gemma's sandwich norms), else x += o
    f = W_down(act(h2 @ W_gate) * (h2 @ W_up)), h2 = RMSNorm(x) * ffn_norm; act SiLU or GELU-tanh
    x += RMSNorm(f) * post_ffw_norm  (Gemma), else x += f
Then logits = RMSNorm(x) * output_norm @ W_out (tied to token_embd where the file has no
`output.weight`), soft-capped for Gemma 2 and 3. What varies is ModelConfig's (read from the GGUF
metadata by gguf/model_config.py) or found in the tensor list, as llama.cpp finds it: a fused
`attn_qkv` (Phi 3), an `ffn_up` holding [gate | up] with no `ffn_gate` (Phi 3), q/k/v biases.
Weights keep their GGUF names: `blk.{i}.attn_q.weight` is `layers[i].attn_q...`.

`shard` (tensor parallelism, llcuda/parallel/): an object whose `weight(name, QuantTensor)` and
`vector(name, tensor)` return this rank's slice of each tensor as it is read; the config then
holds this rank's head and FFN counts. The all-reduces are added by the caller around the
row-parallel layers (attn_output, ffn_down), so nothing here knows about ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from llcuda.config import ModelConfig
from llcuda.gguf.reader import GGUFError, GGUFFile
from llcuda.kernels import ops
from llcuda.kernels.decode_block_cpu import decode_block as decode_block_cpu
from llcuda.kernels.matmul_path import GEMV_MAX_M
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.layers.linear import FusedQuantLinear, QuantLinear, paired_partials
from llcuda.layers.quant_tensor import QuantTensor, read_float_tensor
from llcuda.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from llcuda.kernels.q8_activations import Q8Rows


def _gemv_rows(x: torch.Tensor) -> bool:
    """Whether x's rows go through the GPU decode GEMVs (the only readers of Q8Rows)."""
    return x.is_cuda and x.shape[0] <= GEMV_MAX_M


class WeightShard(Protocol):
    """This rank's slice of each tensor as the decoder reads it (llcuda/parallel/sharding.py)."""

    def weight(self, name: str, weight: QuantTensor) -> QuantTensor: ...

    def vector(self, name: str, vector: torch.Tensor) -> torch.Tensor: ...


class _BlockTensors:
    """blk.{index}.* of one GGUF file, with errors that name the missing tensor."""

    def __init__(self, gguf: GGUFFile, index: int, device: torch.device,
                 shard: WeightShard | None = None):  # fmt: skip
        self.gguf, self.prefix, self.device, self.shard = gguf, f"blk.{index}.", device, shard

    def has(self, name: str) -> bool:
        return self.prefix + name in self.gguf.tensors

    def _require(self, name: str) -> str:
        full = self.prefix + name
        if full not in self.gguf.tensors:
            raise GGUFError(f"{self.gguf.path}: missing tensor {full!r}")
        return full

    def weight(self, name: str) -> QuantTensor:
        full = self._require(f"{name}.weight")
        return _read_weight(self.gguf, full, self.shard)

    def vector(self, name: str) -> torch.Tensor:
        """A norm weight or a bias, fp32 on the block's device."""
        full = self._require(name)
        vector = read_float_tensor(self.gguf, full)
        if self.shard is not None:
            vector = self.shard.vector(full, vector)
        return vector.to(self.device)


def _read_weight(gguf: GGUFFile, name: str, shard: WeightShard | None) -> QuantTensor:
    weight = QuantTensor.from_gguf(gguf, name)
    return weight if shard is None else shard.weight(name, weight)


class DecoderBlock:
    def __init__(
        self,
        gguf: GGUFFile,
        config: ModelConfig,
        index: int,
        device: torch.device,
        rotary: RotaryEmbedding,
        flash_attn: bool | None,
        shard: WeightShard | None = None,
    ):
        self.config, self.device, self.rotary, self.flash_attn = config, device, rotary, flash_attn
        self.sliding_window = config.sliding_window if config.is_sliding(index) else 0
        t = _BlockTensors(gguf, index, device, shard)

        self.attn_norm = t.vector("attn_norm.weight")
        # q|k|v read the same input: one matmul where their quant types agree. Q4_K_M gives v
        # more bits on some layers: there q|k is one matmul and v another (one launch in decode).
        self.attn_v: QuantLinear | None = None
        if t.has("attn_qkv.weight"):  # Phi 3 stores them fused: [q | k | v] rows
            self.attn_qkv = FusedQuantLinear([t.weight("attn_qkv")], device)
        else:
            q, k, v = t.weight("attn_q"), t.weight("attn_k"), t.weight("attn_v")
            if (v.qtype, v.shape[1]) == (q.qtype, q.shape[1]) == (k.qtype, k.shape[1]):
                self.attn_qkv = FusedQuantLinear([q, k, v], device)
            else:
                self.attn_qkv = FusedQuantLinear([q, k], device)
                self.attn_v = QuantLinear(v, device)
        # Qwen 2's biases [bq | bk | bv], added by the kernel that reads the matmul's partials
        self.qkv_bias: torch.Tensor | None = None
        if t.has("attn_q.bias"):
            self.qkv_bias = torch.cat([t.vector(f"attn_{n}.bias") for n in "qkv"])
        self.attn_q_norm = t.vector("attn_q_norm.weight") if config.qk_norm else None
        self.attn_k_norm = t.vector("attn_k_norm.weight") if config.qk_norm else None
        self.attn_output = QuantLinear(t.weight("attn_output"), device)
        self.post_attention_norm = (
            t.vector("post_attention_norm.weight") if config.post_norms else None
        )
        self.ffn_norm = t.vector("ffn_norm.weight")
        if t.has("ffn_gate.weight"):
            self.ffn_gate_up = FusedQuantLinear([t.weight("ffn_gate"), t.weight("ffn_up")], device)
        else:  # Phi 3: ffn_up is [gate | up], 2 * n_ff rows
            self.ffn_gate_up = FusedQuantLinear([t.weight("ffn_up")], device)
        self.ffn_down = QuantLinear(t.weight("ffn_down"), device)
        self.post_ffw_norm = t.vector("post_ffw_norm.weight") if config.post_norms else None
        # the pre-norm of what follows (the next block's attn_norm, or output_norm): the model's
        self.next_norm: torch.Tensor | None = None
        # Whether the decode GEMVs reading a norm's output take it quantized to int8 from that
        # norm (kernels/q8_activations), written once instead of quantized again in every GEMV
        # program. q|k|v's (this block's input norm) and gate|up's; next_q8 is the next block's
        # q8_attn, or the LM head's for the last block (the model sets it).
        self.q8_attn = self.attn_qkv.reads_q8_rows()
        self.q8_ffn = self.ffn_gate_up.reads_q8_rows()
        self.next_q8 = False
        # the C++ decode step of this block (kernels/decode_block_cpu), built on first use
        self.native_decode: object | None = None

    def __call__(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
        hq: Q8Rows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Q8Rows | None]:
        """x: the residual stream [num_tokens, hidden_size]; h: RMSNorm(x)*attn_norm, computed by
        the previous block, hq its Q8Rows if that norm wrote them. Returns the new residual, its
        norm for the next block and that norm's Q8Rows (None where next_q8 does not ask)."""
        if x.device.type == "cpu":  # a decode step: one native call (None: not this step)
            out = decode_block_cpu(self, x, h, positions, meta, cache)
            if out is not None:
                return (*out, None)
        cfg = self.config
        num_tokens, eps = x.shape[0], cfg.rms_norm_eps
        decode = _gemv_rows(x)

        # split-K partial sums [S, num_tokens, n]: the next kernel adds them up as it loads
        qk_size = cfg.q_size + cfg.kv_size
        if self.attn_v is None:
            qkv = self.attn_qkv.partials(h, hq)  # [S, num_tokens, qk_size + kv_size]
            qk, v = qkv[..., :qk_size], qkv[..., qk_size:]
        else:
            qk, v = paired_partials(self.attn_qkv, self.attn_v, h, hq)
        q = ops.qk_norm_rope_store_kv(
            qk, v, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.attn_q_norm,
            self.attn_k_norm, self.rotary.cos, self.rotary.sin, positions, eps,
            cfg.attention_scale, cache.k, cache.v, meta.slot_mapping, rope_neox=cfg.rope_neox,
            bias=self.qkv_bias,
        )  # fmt: skip  [num_tokens, num_heads, head_dim]; this step's k, v are in the cache
        attn = ops.paged_attention(
            q, cache.k, cache.v, meta, self.sliding_window, self.flash_attn,
            softcap=cfg.attn_logit_softcapping,
        )  # fmt: skip
        # the two tall-K projections hand their split-K partial sums straight to the norm
        attn = self.attn_output.partials(attn.reshape(num_tokens, cfg.q_size))
        x, h, hq = ops.residual_rms_norm(x, attn, self.post_attention_norm, self.ffn_norm, eps,
                                         q8=decode and self.q8_ffn)  # fmt: skip

        f = self.ffn_down.partials(self.ffn_gate_up.gated(h, cfg.hidden_act, hq))  # act in epilogue
        return ops.residual_rms_norm(x, f, self.post_ffw_norm, self.next_norm, eps,
                                     q8=decode and self.next_q8)  # fmt: skip


class DecoderForCausalLM:
    """The whole model. Blocks may live on different devices (partial GPU offload)."""

    def __init__(
        self,
        gguf: GGUFFile,
        config: ModelConfig,
        block_devices: list[torch.device],
        head_device: torch.device,
        max_positions: int,
        flash_attn: bool | None = None,
        progress=None,
        shard: WeightShard | None = None,
    ):
        self.config = config
        self.block_devices = block_devices
        self.head_device = head_device
        rope_dim = config.rope_dim or config.head_dim
        factors_name = config.rope_factors_for(max_positions)
        factors = read_float_tensor(gguf, factors_name).reshape(-1) if factors_name else None
        rotaries: dict[tuple[bool, torch.device], RotaryEmbedding] = {}
        self.layers = []
        for i, device in enumerate(block_devices):
            local = config.is_sliding(i)
            key = (local, device)
            if key not in rotaries:
                base = config.rope_theta_local if local else config.rope_theta
                scale = 1.0 if local else 1.0 / config.rope_scaling_factor
                rotaries[key] = RotaryEmbedding(
                    rope_dim, max_positions, base, scale, device, freq_factors=factors
                )
            self.layers.append(
                DecoderBlock(gguf, config, i, device, rotaries[key], flash_attn, shard)
            )
            if progress is not None:
                progress(1)
        head_name = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        self.output = QuantLinear(_read_weight(gguf, head_name, shard), head_device)
        # Embedding rows: from the tied head's copy when it sits on the first block's device (one
        # gather kernel; a 512-token prompt costs ~15 ms dequantized on the CPU), otherwise from
        # the memory-mapped blocks on the CPU, as llama.cpp does for partial offload.
        self.token_embd: object = _read_weight(gguf, "token_embd.weight", shard)
        if config.tie_word_embeddings and head_device.type != "cpu" and (
            block_devices[0] == head_device
        ):
            self.token_embd = self.output.weight
        self.output_norm = read_float_tensor(gguf, "output_norm.weight").to(head_device)
        # Each block ends with the pre-norm of what follows it (fused with its residual add).
        for block, following in zip(self.layers[:-1], self.layers[1:], strict=True):
            block.next_norm = following.attn_norm.to(block.device)
            block.next_q8 = following.q8_attn and following.device == block.device
        self.layers[-1].next_norm = self.output_norm.to(self.layers[-1].device)
        self.layers[-1].next_q8 = self.output.reads_q8_rows() and head_device == block_devices[-1]
        # (output of the last forward, its Q8Rows): compute_logits reads them for that very tensor
        self._last_q8: tuple[torch.Tensor, Q8Rows] | None = None
        if progress is not None:
            progress(1)

    def embed(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [num_tokens] -> scaled embeddings [num_tokens, hidden_size] fp32, on the
        first block's device or on the CPU (see __init__); or written into `out` (any device)."""
        return ops.embedding(self.token_embd, input_ids, self.config.embedding_scale, out)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        metas: dict[torch.device, AttentionMetadata],
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """x: embeddings [num_tokens, hidden_size], positions: [num_tokens] -> final hidden
        states [num_tokens, hidden_size], already through the output norm. `metas` holds the
        step's metadata on every device in use. Everything here runs on the blocks' devices: the
        decode step on one GPU is captured whole in a CUDA graph."""
        first = self.layers[0]
        x = x.to(first.device)
        eps = self.config.rms_norm_eps
        if first.q8_attn and _gemv_rows(x):
            h, hq = ops.rms_norm_q8(x, first.attn_norm, eps)
        else:
            h, hq = ops.rms_norm(x, first.attn_norm, eps), None
        group_metas: dict[tuple[torch.device, int], AttentionMetadata] = {}
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            dev = layer.device
            key = (dev, cache.group)  # sliding layers may read a cache group of their own
            if key not in group_metas:
                group_metas[key] = metas[dev].for_group(cache.group)
            # hq is None where the next block is on another device (its next_q8 is False)
            x, h, hq = layer(x.to(dev), h.to(dev), positions.to(dev), group_metas[key], cache, hq)
        self._last_q8 = (h, hq) if hq is not None else None
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: normed [n, hidden_size] -> logits [n, vocab_size] fp32 (final softcap applied).
        Given forward's own output (every row, as a decode step passes it), the LM head reads the
        Q8Rows the last norm wrote beside it; any other tensor (a row selection) is quantized by
        the head's GEMV itself."""
        hq = self._last_q8[1] if self._last_q8 is not None and self._last_q8[0] is hidden else None
        logits = self.output(hidden.to(self.head_device), hq)
        cap = self.config.final_logit_softcapping
        if cap > 0:
            logits = ops.softcap(logits, cap)  # in place: the matmul's output is ours
        return logits
