"""The shared decoder on one tensor-parallel rank: sliced weights, one all-reduce per half-block.

Per block (Megatron-LM): q|k|v and gate|up are column-parallel (this rank's heads and FFN rows;
attention runs on its own heads and KV cache without talking to anyone), attn_output and
ffn_down row-parallel (this rank's input features: a partial sum of the full output, summed over
the ranks by one all-reduce each). The residual stream and the norms are replicated. The
embedding is vocab-parallel (each rank gathers the ids it holds, zeros elsewhere, all-reduce);
the LM head too (each rank's vocabulary slice of the logits, all-gathered).
"""

from __future__ import annotations

import torch

from llcuda.gguf.reader import GGUFFile
from llcuda.kernels import ops
from llcuda.layers.linear import QuantLinear
from llcuda.models.decoder import DecoderForCausalLM
from llcuda.parallel.group import TensorParallelGroup
from llcuda.parallel.sharding import ShardPlan


class RowParallelLinear:
    """A QuantLinear over this rank's input features whose outputs are summed over the ranks."""

    def __init__(self, local: QuantLinear, group: TensorParallelGroup):
        self.local, self.group = local, group
        self.in_features, self.out_features = local.in_features, local.out_features
        self.qtype, self.nbytes = local.qtype, local.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features / tp] -> [num_tokens, out_features], summed over the ranks
        return self.group.all_reduce(self.local(x).contiguous())

    def partials(self, x: torch.Tensor) -> torch.Tensor:
        # one partial [1, num_tokens, out_features]: the ranks' split-K sum is the all-reduce
        return self(x).unsqueeze(0)


class TensorParallelDecoder(DecoderForCausalLM):
    """Rank `plan.rank`'s part of the model; every rank runs embed / forward / compute_logits
    on the same step, in the same order (their collectives pair up)."""

    def __init__(self, gguf: GGUFFile, plan: ShardPlan, group: TensorParallelGroup,
                 device: torch.device, max_positions: int, flash_attn: bool | None = None,
                 progress=None):  # fmt: skip
        config = plan.local_config
        super().__init__(gguf, config, [device] * config.num_layers, device, max_positions,
                         flash_attn, progress, shard=plan)  # fmt: skip
        self.plan, self.group = plan, group
        for layer in self.layers:
            layer.attn_output = RowParallelLinear(layer.attn_output, group)
            layer.ffn_down = RowParallelLinear(layer.ffn_down, group)

    def embed(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [num_tokens] (the whole vocabulary) -> [num_tokens, hidden_size] fp32."""
        local = input_ids - self.plan.vocab_start
        mine = (local >= 0) & (local < self.plan.vocab_end - self.plan.vocab_start)
        rows = ops.embedding(
            self.token_embd, torch.where(mine, local, 0), self.config.embedding_scale
        )  # [num_tokens, hidden_size]
        rows = rows.to(self.group.device) * mine.to(self.group.device)[:, None]
        rows = self.group.all_reduce(rows)
        return rows if out is None else out.copy_(rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: normed [n, hidden_size] -> logits [n, vocab_size] fp32 on every rank."""
        local = self.output(hidden.to(self.head_device))  # [n, this rank's vocab rows]
        pad = self.plan.vocab_shard - local.shape[1]  # the last shard may be shorter
        if pad:
            local = torch.nn.functional.pad(local, (0, pad), value=float("-inf"))
        logits = self.group.all_gather_cols(local)[:, : self.plan.config.vocab_size]
        cap = self.config.final_logit_softcapping
        return ops.softcap(logits.contiguous(), cap) if cap > 0 else logits
