"""Open the real model on one device and run one sequence straight through it with a private
paged KV cache (tests only)."""

from __future__ import annotations

import torch

from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.models.registry import build_model


@torch.inference_mode()
def sequence_logits(
    model, token_ids: list[int], logit_positions: list[int], chunk: int = 256, block_size: int = 32
) -> torch.Tensor:
    """Feed one sequence in prefill chunks of `chunk` tokens through a private paged cache whose
    blocks are deliberately out of order; returns logits [len(logit_positions), vocab] float32.
    The caches live where the model's blocks do (fp16 on a GPU, as the engine keeps them)."""
    cfg = model.config
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    block_table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    block_table = block_table.to(torch.int32)
    caches = [
        KVCache.allocate(
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            torch.float16 if device.type == "cuda" else torch.float32,
            device,
        )
        for device in model.block_devices
    ]
    wanted = {p: i for i, p in enumerate(logit_positions)}
    hidden_rows = [None] * len(logit_positions)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        positions = torch.arange(start, stop)
        slots = block_table[positions // block_size].long() * block_size + positions % block_size
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.tensor([0, stop - start], dtype=torch.int32),
            seq_lens=torch.tensor([stop], dtype=torch.int32),
            block_tables=block_table[None, :],
            max_query_len=stop - start,
            max_seq_len=stop,
        )
        ids = torch.tensor(token_ids[start:stop])
        metas = {device: meta.to(device) for device in set(model.block_devices)}
        hidden = model.forward(model.embed(ids), positions, metas, caches)
        for p in range(start, stop):
            if p in wanted:
                hidden_rows[wanted[p]] = hidden[p - start]
    return model.compute_logits(torch.stack(hidden_rows))


def open_gemma(path, device: str):
    """The whole model on one device, straight from the GGUF (no engine); close the GGUF after."""
    gguf = GGUFFile(path)
    config = model_config_from_gguf(gguf)
    dev = torch.device(device)
    return gguf, build_model(gguf, config, [dev] * config.num_layers, dev, max_positions=4096)
