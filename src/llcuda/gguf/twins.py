"""Small random-weight GGUF twins of every supported architecture, for the exactness oracle.

Each twin is written the way a real file comes to be: float weights in Hugging Face layout drawn
from a seed, turned into GGUF tensors as convert_hf_to_gguf.py does (llama: Q/K rows permuted for
pairwise RoPE; gemma: norms stored as 1 + w; llama 3: a `rope_freqs` tensor), then quantized into
a mix of Q4_K, Q5_K, Q6_K, Q8_0, Q4_0 and F16 (the 2-D weights take those types in turn, so every
layer holds several) with F32 norms and biases, as llama-quantize would leave them. The bytes are
a function of (twin, seed) alone: tests/data/oracle/*.json records each file's sha256.

Scales keep activations O(1): weights N(0, 1/fan_in) (q and k 1.5x, so attention logits reach a
few units and a wrong rope, mask or soft-cap moves the result), embeddings and the LM head
N(0, 0.15^2) (0.06 for Gemma; logits of a few nats), norms 1 + N(0, 0.1^2), biases N(0, 0.2^2).

    python -m llcuda.gguf.twins OUT.gguf --twin qwen3 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from llcuda.gguf.arch_spec import (
    ArchSpec,
    arch_metadata,
    llama3_rope_factors,
    longrope_factors,
    tensor_list,
)
from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.gguf.quant_mixes import FILE_TYPES, mix_type
from llcuda.gguf.quantize import quantize
from llcuda.gguf.synthetic import synthetic_vocab
from llcuda.gguf.synthetic_vocab import BPE_SPECIALS, bpe_vocab, spm_vocab

TWINS: dict[str, ArchSpec] = {
    # Llama 3.x: rope_freqs (llama3 scaling with a short original context so the factors matter
    # within the oracle's 64 tokens), tied embeddings, GQA 2
    "llama3": ArchSpec(
        "llama", n_embd=256, n_layers=3, n_ff=768, n_head=4, n_kv_head=2, head_dim=64,
        vocab_size=1024, context_length=8192, rope_theta=500000.0, tied=True,
        llama3_rope=(8.0, 1.0, 4.0, 128), tokenizer="llama-bpe", name="Synthetic Llama 3 Twin",
    ),
    # SmolLM2 / TinyLlama-like llama: no rope scaling, untied head, GQA 4
    "llama": ArchSpec(
        "llama", n_embd=256, n_layers=3, n_ff=512, n_head=4, n_kv_head=1, head_dim=64,
        vocab_size=768, context_length=2048, rope_theta=10000.0, tied=False,
        tokenizer="smollm", name="Synthetic SmolLM Twin",
    ),
    "qwen2": ArchSpec(
        "qwen2", n_embd=256, n_layers=3, n_ff=512, n_head=4, n_kv_head=2, head_dim=64,
        vocab_size=1024, context_length=32768, rope_theta=1e6, rms_eps=1e-6, tied=False,
        tokenizer="qwen2", name="Synthetic Qwen2.5 Twin",
    ),
    # head_dim 64 != n_embd / n_head = 32 (and != transformers' Qwen3 default of 128)
    "qwen3": ArchSpec(
        "qwen3", n_embd=256, n_layers=3, n_ff=512, n_head=8, n_kv_head=2, head_dim=64,
        vocab_size=1024, context_length=40960, rope_theta=1e6, rms_eps=1e-6, tied=True,
        tokenizer="qwen2", name="Synthetic Qwen3 Twin",
    ),
    "phi3": ArchSpec(
        "phi3", n_embd=256, n_layers=3, n_ff=512, n_head=4, n_kv_head=2, head_dim=64,
        vocab_size=1024, context_length=4096, rope_theta=10000.0, tied=False,
        sliding_window=2047, tokenizer="spm", name="Synthetic Phi 3 Twin",
    ),
    # Phi-3.5 / 128k-style LongRoPE: a trained context of 32 < the oracle's 64 tokens, so both
    # sides take the long factors (transformers by sequence length, llama.cpp by context size)
    "phi3_longrope": ArchSpec(
        "phi3", n_embd=256, n_layers=3, n_ff=512, n_head=4, n_kv_head=2, head_dim=64,
        vocab_size=1024, context_length=4096, rope_theta=10000.0, tied=False,
        sliding_window=2047, longrope_original_context=32, tokenizer="spm",
        name="Synthetic Phi 3 LongRoPE Twin",
    ),
    # layers 0, 2 local (window 16 < the oracle's 64 tokens); soft-caps small enough to bite
    "gemma2": ArchSpec(
        "gemma2", n_embd=256, n_layers=4, n_ff=512, n_head=4, n_kv_head=2, head_dim=128,
        vocab_size=1024, context_length=8192, rms_eps=1e-6, tied=True, sliding_window=16,
        attn_softcap=5.0, final_softcap=8.0, tokenizer="gemma", name="Synthetic Gemma 2 Twin",
    ),
    # six layers: llama.cpp's default period 6 makes layer 5 global, layers 0-4 local
    "gemma3": ArchSpec(
        "gemma3", n_embd=256, n_layers=6, n_ff=512, n_head=2, n_kv_head=1, head_dim=128,
        vocab_size=1024, context_length=32768, rope_theta=1e6, rms_eps=1e-6, tied=True,
        sliding_window=16, tokenizer="gemma", name="Synthetic Gemma 3 Twin",
    ),
}  # fmt: skip
# Twins in the tensor-type mix of a real llama-quantize file type (quant_mixes.mix_type) instead
# of TYPE_CYCLE: the llama3 twin (n_head / n_kv_head = 2, 3 layers, every row a multiple of 256).
TWIN_MIXES = {"llama3-q3_k_m": "Q3_K_M", "llama3-q2_k": "Q2_K", "llama3-iq4_xs": "IQ4_XS",
              "llama3-iq2_xs": "IQ2_XS"}  # fmt: skip
TWINS.update({name: TWINS["llama3"] for name in TWIN_MIXES})

TYPE_CYCLE = (
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.F16,
)  # fmt: skip
_FILE_TYPE_Q4_K_M = FILE_TYPES["Q4_K_M"]  # what a twin without a mix says it is
_STR, _U32, _F32, _BOOL = (
    GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL,
)  # fmt: skip


# ------------------------------------------------------------------------ weights


def permute_for_norm_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> llama.cpp's pairs.
    w [n_head * head_dim, ...]: within each head, row (i, half) moves to (2i + half)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(spec: ArchSpec, seed: int) -> dict[str, np.ndarray]:
    """The twin's float32 weights in Hugging Face layout and values (Gemma norms as w, not 1+w)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for hf_name, _, shape in tensor_list(spec):
        if hf_name == "rope_freqs":
            out[hf_name] = llama3_rope_factors(spec)
            continue
        if hf_name.startswith("rope_factors_"):
            out[hf_name] = longrope_factors(spec)[hf_name]
            continue
        noise = rng.standard_normal(shape, dtype=np.float32)
        if hf_name.endswith("norm.weight"):
            w = 0.1 * noise if spec.is_gemma else 1.0 + 0.1 * noise
        elif hf_name.endswith(".bias"):
            w = 0.2 * noise
        elif hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            # Gemma multiplies the embedding by sqrt(n_embd): a tied head would mostly echo the
            # input token unless its rows are smaller
            w = (0.06 if spec.is_gemma else 0.15) * noise
        else:
            gain = 1.5 if any(p in hf_name for p in ("q_proj", "k_proj")) else 1.0
            gain = 1.2 if "qkv_proj" in hf_name else gain
            w = (gain / np.sqrt(np.float32(shape[1]))) * noise
        out[hf_name] = w.astype(np.float32)
    return out


def gguf_tensors(
    spec: ArchSpec, seed: int, type_cycle: tuple[GGMLType, ...] = TYPE_CYCLE,
    mix: str | None = None,
) -> list[tuple[str, np.ndarray, GGMLType]]:  # fmt: skip
    """(GGUF name, data, type) in file order, converted and quantized as described above (the
    2-D weights take the types of `type_cycle` in turn, or those llama-quantize gives them in
    file type `mix`)."""
    weights = hf_weights(spec, seed)
    out, n_matrices = [], 0
    for hf_name, name, _ in tensor_list(spec):
        w = weights[hf_name]
        if spec.arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
            w = permute_for_norm_rope(w, spec.n_head if "q_proj" in hf_name else spec.n_kv_head)
        if spec.is_gemma and hf_name.endswith("norm.weight"):
            w = 1.0 + w  # Gemma2Model / Gemma3Model.modify_tensors: GGUF norms hold 1 + w
        if w.ndim == 1:
            out.append((name, np.ascontiguousarray(w, dtype=np.float32), GGMLType.F32))
            continue
        qtype = type_cycle[n_matrices % len(type_cycle)]
        if mix is not None:
            layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
            qtype = mix_type(mix, name, w.shape[1], layer, spec.n_layers,
                             spec.n_head // spec.n_kv_head, spec.tied)  # fmt: skip
        n_matrices += 1
        if w.shape[1] % QUANT_SIZES[qtype][0]:
            raise ValueError(f"{name}: row length {w.shape[1]} does not fit {qtype.name} blocks")
        out.append((name, quantize(w, qtype), qtype))
    return out


# ------------------------------------------------------------------------ metadata


def tokenizer_metadata(spec: ArchSpec) -> list[tuple[str, object, GGUFValueType, object]]:
    """tokenizer.ggml.* as the converter writes them for the twin's tokenizer family."""
    arr, b = GGUFValueType.ARRAY, None
    n = spec.vocab_size
    if spec.tokenizer in BPE_SPECIALS:
        tokens, types, merges, bos, eos = bpe_vocab(n, spec.tokenizer)
        add_bos = spec.tokenizer == "llama-bpe"
        return [
            ("tokenizer.ggml.model", "gpt2", _STR, b),
            ("tokenizer.ggml.pre", spec.tokenizer, _STR, b),
            ("tokenizer.ggml.tokens", tokens, arr, _STR),
            ("tokenizer.ggml.token_type", types, arr, GGUFValueType.INT32),
            ("tokenizer.ggml.merges", merges, arr, _STR),
            ("tokenizer.ggml.bos_token_id", bos, _U32, b),
            ("tokenizer.ggml.eos_token_id", eos, _U32, b),
            ("tokenizer.ggml.padding_token_id", eos, _U32, b),
            ("tokenizer.ggml.add_bos_token", add_bos, _BOOL, b),
        ]
    if spec.tokenizer == "spm":  # Phi-3: llama SPM with <|endoftext|> and chat specials at the end
        specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
        tokens, scores, types = spm_vocab(n, specials)
        ids = dict(bos=1, eos=tokens.index("<|endoftext|>"), unk=0, pad=tokens.index("<|end|>"))
        add_bos = True
    elif spec.tokenizer == "gemma":
        tokens, scores, types = synthetic_vocab(n)
        ids, add_bos = dict(bos=2, eos=1, unk=3, pad=0), True
    else:
        raise ValueError(f"unknown twin tokenizer {spec.tokenizer!r}")
    gemma = [("tokenizer.ggml.add_space_prefix", False, _BOOL, b)] if spec.is_gemma else []
    return [
        ("tokenizer.ggml.model", "llama", _STR, b),
        ("tokenizer.ggml.pre", "default", _STR, b),
        ("tokenizer.ggml.tokens", tokens, arr, _STR),
        ("tokenizer.ggml.scores", scores, arr, _F32),
        ("tokenizer.ggml.token_type", types, arr, GGUFValueType.INT32),
        ("tokenizer.ggml.bos_token_id", ids["bos"], _U32, b),
        ("tokenizer.ggml.eos_token_id", ids["eos"], _U32, b),
        ("tokenizer.ggml.unknown_token_id", ids["unk"], _U32, b),
        ("tokenizer.ggml.padding_token_id", ids["pad"], _U32, b),
        ("tokenizer.ggml.add_bos_token", add_bos, _BOOL, b),
        ("tokenizer.ggml.add_eos_token", False, _BOOL, b),
        *gemma,
    ]


def twin_metadata(spec: ArchSpec, file_type: int = _FILE_TYPE_Q4_K_M) -> list[tuple]:
    """Every KV pair after general.architecture, in the converter's order."""
    general = [
        ("general.type", "model", _STR, None),
        ("general.name", spec.name or f"Synthetic {spec.arch} twin", _STR, None),
        ("general.size_label", "synthetic", _STR, None),
    ]
    arch = [(k, v, t, None) for k, v, t in arch_metadata(spec, file_type)]
    return [
        *general, *arch, *tokenizer_metadata(spec),
        ("general.quantization_version", 2, _U32, None),
    ]  # fmt: skip


# ------------------------------------------------------------------------ writing


def write_twin(
    path: str | Path, twin: str, seed: int = 0, type_cycle: tuple[GGMLType, ...] = TYPE_CYCLE
) -> Path:
    """Write twin `twin` (a key of TWINS) to `path`; the bytes depend on (twin, seed) only.
    type_cycle=(GGMLType.F32,) writes the same weights unquantized (a cross-check where
    llama.cpp's CPU kernels do not round activations to 8 bits); a twin of TWIN_MIXES takes its
    mix's types otherwise."""
    if twin not in TWINS:
        raise ValueError(f"unknown twin {twin!r} (known: {', '.join(TWINS)})")
    mix = TWIN_MIXES.get(twin) if type_cycle == TYPE_CYCLE else None
    return write_spec(path, TWINS[twin], seed, type_cycle, mix)


def write_spec(
    path: str | Path, spec: ArchSpec, seed: int = 0,
    type_cycle: tuple[GGMLType, ...] = TYPE_CYCLE, mix: str | None = None,
) -> Path:  # fmt: skip
    """Write `spec` (a twin's, or a variant of one) to `path` as write_twin does."""
    path = Path(path)
    writer = GGUFWriter(path, spec.arch)
    file_type = FILE_TYPES[mix] if mix else _FILE_TYPE_Q4_K_M
    for key, value, vtype, sub in twin_metadata(spec, file_type):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, qtype in gguf_tensors(spec, seed, type_cycle, mix):
        raw = None if qtype in (GGMLType.F32, GGMLType.F16) else GGMLQuantizationType(int(qtype))
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llcuda.gguf.twins", description="Write a small random-weight GGUF twin."
    )
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--twin", choices=sorted(TWINS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_twin(args.out, args.twin, args.seed)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) sha256 {sha256_file(path)}")


if __name__ == "__main__":
    main()
