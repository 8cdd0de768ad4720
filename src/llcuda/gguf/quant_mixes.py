"""Which tensor type llama-quantize gives each weight, for the file types llcuda's twins mimic.

Restates llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp: `llama_tensor_get_type_impl`
and `tensor_type_fallback`) for dense (non-MoE, non-Falcon, non-70B) models quantized without an
importance matrix, for the mixes Q4_K_M, Q3_K_M, Q2_K, IQ4_XS and IQ2_XS (plus the uniform Q8_0,
F16 and F32). Per mix, the default type and its exceptions:

- Q4_K_M (Q4_K): attn_v and ffn_down on `use_more_bits` layers Q6_K.
- Q3_K_M (Q3_K): attn_v (and a fused attn_qkv) Q5_K on the first two layers, then Q4_K;
  ffn_down Q5_K on the first n_layers/16 layers, then Q4_K; attn_output Q4_K.
- Q2_K (Q2_K): attn_v Q4_K when n_head / n_kv_head >= 4, else Q3_K; ffn_down and attn_output Q3_K.
- IQ4_XS (IQ4_XS): attn_v Q5_K when n_head / n_kv_head >= 4; ffn_down Q5_K on the first
  n_layers/8 layers.
- IQ2_XS (IQ2_XS): attn_v Q4_K when n_head / n_kv_head >= 4, else Q2_K; ffn_down Q2_K on the first
  n_layers/8 layers; an untied token_embd Q2_K.
The output head (and a tied token_embd, quantized as the output) is Q6_K, Q5_K for IQ2_XS, Q8_0
for the Q8_0 mix or when its rows are not a multiple of the default type's block. Then a row
length (ne0) the chosen type's block does not divide falls back: IQ types to IQ4_NL, Q2_K/Q3_K
to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 if even that does not fit.
"""

from __future__ import annotations

from llcuda.gguf.constants import QUANT_SIZES, GGMLType

T = GGMLType
# mix -> llama_ftype (general.file_type)
FILE_TYPES = {"Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10, "IQ4_XS": 30, "IQ2_XS": 20, "Q8_0": 7,
              "F16": 1, "F32": 0}  # fmt: skip
MIXES = tuple(FILE_TYPES)
_DEFAULT = {"Q4_K_M": T.Q4_K, "Q3_K_M": T.Q3_K, "Q2_K": T.Q2_K, "IQ4_XS": T.IQ4_XS,
            "IQ2_XS": T.IQ2_XS, "Q8_0": T.Q8_0, "F16": T.F16, "F32": T.F32}  # fmt: skip
_FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}  # fmt: skip


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the layers that get more bits in the *_M mixes."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def fallback(qtype: GGMLType, ne0: int) -> GGMLType:
    """tensor_type_fallback: a type whose block does not divide the row length ne0 falls back."""
    if ne0 % QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype not in _FALLBACK:
        raise ValueError(f"no fallback for {qtype.name} rows of {ne0}")
    out = _FALLBACK[qtype]
    return out if ne0 % QUANT_SIZES[out][0] == 0 else T.F16


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for kind in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate",
                 "ffn_down"):  # fmt: skip
        if f"{kind}.weight" in name or (kind.startswith("ffn") and kind in name):
            return kind
    return "other"


def mix_type(mix: str, name: str, ne0: int, i_layer: int, n_layers: int, n_gqa: int = 1,
             tied: bool = False) -> GGMLType:  # fmt: skip
    """The type of 2-D weight `name` (GGUF name, e.g. blk.3.attn_v.weight) with rows of ne0 in
    layer i_layer of n_layers, in file type `mix`; n_gqa = n_head / n_kv_head; tied: the file has
    no output.weight (the token embedding is the head)."""
    if mix not in _DEFAULT:
        raise ValueError(f"unknown mix {mix!r}; choose one of {MIXES}")
    new = _DEFAULT[mix]
    if mix in ("F16", "F32"):
        return new
    cat = _category(name)
    if cat == "output" or (tied and cat == "token_embd"):
        if mix == "Q8_0" or ne0 % QUANT_SIZES[new][0]:
            new = T.Q8_0
        else:
            new = T.Q5_K if mix == "IQ2_XS" else T.Q6_K
    elif cat == "token_embd":
        new = T.Q2_K if mix == "IQ2_XS" else new
    elif mix == "IQ2_XS":
        if cat in ("attn_v", "attn_qkv"):
            new = T.Q4_K if n_gqa >= 4 else T.Q2_K
        elif cat == "ffn_down" and i_layer < n_layers // 8:
            new = T.Q2_K
    elif cat in ("attn_v", "attn_qkv"):
        if mix == "Q2_K":
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if i_layer < 2 else T.Q4_K
        elif mix == "IQ4_XS" and n_gqa >= 4:
            new = T.Q5_K
        elif mix == "Q4_K_M" and use_more_bits(i_layer, n_layers):
            new = T.Q6_K
    elif cat == "ffn_down":
        if mix == "Q2_K":
            new = T.Q3_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if i_layer < n_layers // 16 else T.Q4_K
        elif mix == "IQ4_XS" and i_layer < n_layers // 8:
            new = T.Q5_K
        elif mix == "Q4_K_M" and use_more_bits(i_layer, n_layers):
            new = T.Q6_K
    elif cat == "attn_output":
        new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K}.get(mix, new)
    return fallback(new, ne0)
