"""Which slice of every GGUF tensor one tensor-parallel rank holds (Megatron-LM's split).

Column-parallel (the output features split, no communication): attn_q / attn_k / attn_v (and
Phi 3's fused attn_qkv) by heads, ffn_gate / ffn_up (Phi 3's fused [gate | up]) by FFN rows,
their biases alike. Row-parallel (the input features split, one all-reduce after): attn_output
by heads, ffn_down by FFN columns. Vocab-parallel: token_embd and output by vocabulary rows.
Norms, q/k norms and RoPE factors are replicated.

GGUF stores a weight as rows of whole quant blocks (`[out, in]`, blocks along `in`): a row split
is free, a column split must fall on block boundaries (256 elements for K-quants, 32 for the
legacy types). A shape that does not divide raises ValueError naming the tensor, checked on
rank 0 before any worker starts.

KV heads: with n_kv_heads divisible by tp each rank holds n_kv_heads / tp of them; with tp a
multiple of n_kv_heads each rank holds one, replicated on tp / n_kv_heads ranks (vLLM does the
same): rank r's query heads all read KV head r * n_kv_heads // tp, so its cache holds only that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from llcuda.config import ModelConfig
from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.layers.quant_tensor import QuantTensor

Ranges = tuple[tuple[int, int], ...]  # [start, end) intervals, concatenated in order


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """One rank's part of a 2-D tensor [rows, cols]: rows `rows` (concatenated), columns
    `cols` (one interval, or None for all)."""

    rows: Ranges | None = None
    cols: tuple[int, int] | None = None


class ShardPlan:
    """Rank `rank` of `world_size`: its model config and the slice of each tensor it reads.

    Passed to the decoder as `shard` (models/decoder.py): `weight(name, QuantTensor)` and
    `vector(name, tensor)` cut what the decoder reads.
    """

    def __init__(self, config: ModelConfig, rank: int, world_size: int,
                 tensor_names: Iterable[str]):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside tensor_parallel_size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.tensor_names = frozenset(tensor_names)
        tp, c = world_size, config
        if c.num_heads % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} does not divide the model's {c.num_heads} attention "
                f"heads"
            )
        if c.num_kv_heads % tp == 0:
            self.local_kv_heads = c.num_kv_heads // tp
            self.first_kv_head = rank * self.local_kv_heads
        elif tp % c.num_kv_heads == 0:  # replicate: tp / n_kv ranks share each KV head
            self.local_kv_heads = 1
            self.first_kv_head = rank * c.num_kv_heads // tp
        else:
            raise ValueError(
                f"tensor_parallel_size {tp} neither divides the model's {c.num_kv_heads} KV heads "
                f"nor is a multiple of them"
            )
        if c.intermediate_size % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} does not divide the FFN size {c.intermediate_size}"
            )
        self.local_heads = c.num_heads // tp
        self.local_ffn = c.intermediate_size // tp
        # vocabulary rows: equal shards of ceil(vocab / tp), the last one shorter
        self.vocab_shard = -(-c.vocab_size // tp)
        self.vocab_start = min(rank * self.vocab_shard, c.vocab_size)
        self.vocab_end = min(self.vocab_start + self.vocab_shard, c.vocab_size)
        self.local_config = dataclasses.replace(
            c, num_heads=self.local_heads, num_kv_heads=self.local_kv_heads,
            intermediate_size=self.local_ffn,
        )  # fmt: skip

    # --- which part -----------------------------------------------------------------------------

    def split(self, name: str) -> TensorSplit | None:
        """This rank's part of tensor `name` (None: the whole tensor, replicated)."""
        c, hd = self.config, self.config.head_dim
        q = ((self.rank * self.local_heads * hd, (self.rank + 1) * self.local_heads * hd),)
        kv0 = self.first_kv_head * hd
        kv = ((kv0, kv0 + self.local_kv_heads * hd),)
        ff0 = self.rank * self.local_ffn
        ff = ((ff0, ff0 + self.local_ffn),)
        if name in ("token_embd.weight", "output.weight"):
            return TensorSplit(rows=((self.vocab_start, self.vocab_end),))
        if not name.startswith("blk."):
            return None
        kind = name.split(".", 2)[2]  # "attn_q.weight"
        layer = kind.rsplit(".", 1)[0]
        if layer == "attn_q":
            return TensorSplit(rows=q)
        if layer in ("attn_k", "attn_v"):
            return TensorSplit(rows=kv)
        if layer == "attn_qkv":  # rows [q | k | v]
            k_at, v_at = c.q_size, c.q_size + c.kv_size
            return TensorSplit(rows=q + _shift(kv, k_at) + _shift(kv, v_at))
        if layer == "ffn_gate":
            return TensorSplit(rows=ff)
        if layer == "ffn_up":
            fused = name.replace("ffn_up", "ffn_gate") not in self.tensor_names
            return TensorSplit(rows=ff + _shift(ff, c.intermediate_size) if fused else ff)
        if kind == "attn_output.weight":
            return TensorSplit(cols=q[0])
        if kind == "ffn_down.weight":
            return TensorSplit(cols=ff[0])
        if layer in ("attn_output", "ffn_down"):
            raise ValueError(f"{name}: a row-parallel layer's bias is not supported")
        return None

    def check(self, tensors: Mapping) -> None:
        """Raise ValueError for the first tensor of `tensors` (name -> GGUF tensor info, with
        rows_cols and ggml_type) this rank cannot cut on its quant-block boundaries."""
        for name, info in tensors.items():
            part = self.split(name)
            if part is not None and part.cols is not None:
                _check_block_boundary(name, GGMLType(info.ggml_type), info.rows_cols[1],
                                      part.cols, self.world_size)  # fmt: skip

    def nbytes(self, name: str, info) -> int:
        """Bytes of this rank's part of tensor `name` (info: its GGUF tensor info)."""
        part = self.split(name)
        if part is None:
            return info.nbytes
        kept = sum(b - a for a, b in part.rows) if part.rows is not None else None
        if len(info.shape) == 1:  # a bias: its elements are the "rows" split
            return kept * info.nbytes // info.n_elements
        rows = kept if kept is not None else info.rows_cols[0]
        if part.cols is None:
            return rows * info.row_bytes
        elems, block_bytes = QUANT_SIZES[GGMLType(info.ggml_type)]
        return rows * (part.cols[1] - part.cols[0]) // elems * block_bytes

    # --- the decoder's hooks --------------------------------------------------------------------

    def weight(self, name: str, weight: QuantTensor) -> QuantTensor:
        part = self.split(name)
        if part is None:
            return weight
        data, (rows, cols) = weight.data, weight.shape
        if part.rows is not None:
            pieces = [data[a:b] for a, b in part.rows]  # zero-copy views of the mapping
            data = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            rows = sum(b - a for a, b in part.rows)
        if part.cols is not None:
            _check_block_boundary(name, weight.qtype, cols, part.cols, self.world_size)
            elems, nbytes = QUANT_SIZES[weight.qtype]
            a, b = part.cols
            # whole blocks of every row: a strided view, copied into rows of their own
            data = data[:, a // elems * nbytes : b // elems * nbytes].contiguous()
            cols = b - a
        return QuantTensor(data, weight.qtype, (rows, cols))

    def vector(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        part = self.split(name)
        if part is None:
            return vector
        if part.cols is not None or part.rows is None:
            raise ValueError(f"{name}: a 1-D tensor split along columns")
        return torch.cat([vector[a:b] for a, b in part.rows])


def _shift(ranges: Ranges, offset: int) -> Ranges:
    return tuple((a + offset, b + offset) for a, b in ranges)


def _check_block_boundary(name: str, qtype: GGMLType, cols: int, part: tuple[int, int],
                          world_size: int) -> None:  # fmt: skip
    elems = QUANT_SIZES[qtype][0]
    a, b = part
    if a % elems or b % elems:
        raise ValueError(
            f"{name}: tensor_parallel_size {world_size} splits its {cols} input features into "
            f"{b - a} per rank, which is not a whole number of {qtype.name} blocks of {elems} "
            f"(row-parallel layers split on quant-block boundaries); use a smaller "
            f"tensor_parallel_size or a file whose {name.split('.')[-2]} is a legacy type"
        )
