"""Synthetic Gemma 3 GGUF files: random weights in the exact tensor-type mix of real files.

The mix follows llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the file type
`--mix` (quant_mixes.py restates the rules): by default `--type Q4_K_M`, i.e. Q4_K by default;
Q6_K for attn_v and ffn_down on layers where `use_more_bits` holds (the first and last eighth of
the layers and every third layer between); a row length (ne0) that is not a multiple of 256
falls back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K); the tied token embedding is quantized like an
output tensor: Q6_K, or Q8_0 when ne0 % 256 != 0 (Gemma's widths). Q3_K_M, Q2_K, IQ4_XS and
IQ2_XS mixes follow the same rules for those file types. 1-D norm weights stay F32 (around 1.0:
Gemma GGUFs store 1 + w).

Quantized blocks are random bytes with every f16 scale field overwritten by a finite value in
[0.002, 0.022] (a quarter of that for IQ4_XS, whose code book reaches 127) and Q6_K's int8
sub-block scales set to 1..31, so nothing dequantizes to NaN or Inf.
The file also carries a small but usable SPM ("llama") vocabulary with Gemma's special tokens.

    python -m llcuda.gguf.synthetic OUT.gguf --preset 1b [--mix Q3_K_M]

The same CLI writes the llama / qwen2 benchmark twins of bench_twins.py
(`--preset llama-3.2-1b`, `llama-3.2-3b`, `llama-3.1-8b`, `qwen2.5-7b`), in any mix too.
"""

from __future__ import annotations

import argparse
import itertools
import string
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from llcuda.gguf.constants import QUANT_SIZES, SCALAR_FORMATS, GGMLType
from llcuda.gguf.constants import GGUFValueType as ValueType
from llcuda.gguf.quant_mixes import FILE_TYPES, MIXES, mix_type, use_more_bits  # noqa: F401

GEMMA3_270M = dict(
    n_embd=640, n_layers=18, n_ff=2048, n_head=4, n_kv_head=1, head_dim=256, vocab_size=262144
)
GEMMA3_1B = dict(
    n_embd=1152, n_layers=26, n_ff=6912, n_head=4, n_kv_head=1, head_dim=256, vocab_size=262144
)
# the Gemma 3 4B shape issue 18 measures decode at (its vision tower left out)
GEMMA3_4B = dict(
    n_embd=2560, n_layers=34, n_ff=10240, n_head=8, n_kv_head=4, head_dim=256, vocab_size=262144
)
# small enough for CPU engine tests; pattern 2 makes layers 0, 2 local and 1, 3 global (the
# default period 6 would make all four layers local)
TINY = dict(
    n_embd=256,
    n_layers=4,
    n_ff=512,
    n_head=2,
    n_kv_head=1,
    head_dim=128,
    vocab_size=1024,
    sliding_window=16,
    sliding_window_pattern=2,
)
PRESETS: dict[str, dict[str, int]] = {
    "270m": GEMMA3_270M, "1b": GEMMA3_1B, "4b": GEMMA3_4B, "tiny": TINY
}
# sizes of the real gemma-3-{270m,1b} Q4_K_M files; the CLI pads its twins to these
REAL_FILE_SIZES = {"270m": 253_113_024, "1b": 806_055_968}

_ALIGNMENT = 32
_SCALE_RANGE = (0.002, 0.022)
# byte offsets of the f16 scale fields per block (GGUF-NOTES section 2)
_F16_FIELDS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q5_0: (0,),
    GGMLType.Q8_0: (0,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
    GGMLType.IQ2_XS: (0,),
}
# random IQ4_XS blocks reach d * 32 * 127: a smaller d keeps them near the other types' range
_SCALE_FACTOR = {GGMLType.IQ4_XS: 0.25}
_LAYER_TENSORS = (  # per-layer tensor order of real Gemma 3 files (alphabetical)
    "attn_k",
    "attn_k_norm",
    "attn_norm",
    "attn_output",
    "attn_q",
    "attn_q_norm",
    "attn_v",
    "ffn_down",
    "ffn_gate",
    "ffn_norm",
    "ffn_up",
    "post_attention_norm",
    "post_ffw_norm",
)


# ------------------------------------------------------------------------ tensor-type mix


def tensor_type(
    kind: str, ne0: int, i_layer: int, n_layers: int, mix: str, n_gqa: int = 1
) -> GGMLType:
    """The type llama.cpp picks for a 2-D Gemma 3 weight (`kind` = attn_v, token_embd, ...) in
    file type `mix` (quant_mixes.mix_type; Gemma's token embedding is the tied output head)."""
    name = "token_embd.weight" if kind == "token_embd" else f"blk.{i_layer}.{kind}.weight"
    return mix_type(mix, name, ne0, i_layer, n_layers, n_gqa, tied=True)


def tensor_plan(
    *, n_embd: int, n_layers: int, n_ff: int, n_head: int, n_kv_head: int, head_dim: int,
    vocab_size: int, mix: str = "Q4_K_M",
) -> list[tuple[str, tuple[int, ...], GGMLType]]:  # fmt: skip
    """(name, ne innermost-first, type) for every tensor, in the order real files use."""
    q_dim, kv_dim = n_head * head_dim, n_kv_head * head_dim
    n_gqa = n_head // n_kv_head
    shapes = {  # ne = (in_features, out_features) for weights
        "attn_k": (n_embd, kv_dim),
        "attn_k_norm": (head_dim,),
        "attn_norm": (n_embd,),
        "attn_output": (q_dim, n_embd),
        "attn_q": (n_embd, q_dim),
        "attn_q_norm": (head_dim,),
        "attn_v": (n_embd, kv_dim),
        "ffn_down": (n_ff, n_embd),
        "ffn_gate": (n_embd, n_ff),
        "ffn_norm": (n_embd,),
        "ffn_up": (n_embd, n_ff),
        "post_attention_norm": (n_embd,),
        "post_ffw_norm": (n_embd,),
    }
    plan = [
        ("output_norm.weight", (n_embd,), GGMLType.F32),
        (
            "token_embd.weight",
            (n_embd, vocab_size),
            tensor_type("token_embd", n_embd, 0, n_layers, mix, n_gqa),
        ),
    ]
    for il in range(n_layers):
        for kind in _LAYER_TENSORS:
            ne = shapes[kind]
            t = GGMLType.F32 if len(ne) == 1 else tensor_type(kind, ne[0], il, n_layers, mix, n_gqa)
            plan.append((f"blk.{il}.{kind}.weight", ne, t))
    return plan


# ------------------------------------------------------------------------ vocabulary

_WORDS = """the of and to a in is you that it hello world he was for on are as with his they I
at be this have from or one had by word but not what all were we when your can said
there use an each which she do how their if will up other about out many then them
these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who its now find long down
day did get come made may part over new sound take only little work know place year
live me back give most very after thing our just name good sentence man think say
great where help through much before line right too mean old any same tell boy
follow came want show also around form three small set put end does another well
large must big even such because turn here why ask went men read need land different
home us move try kind hand picture again change off play spell air away animal house
point page letter mother answer found study still learn should model token test
Gemma quick brown fox jumps lazy dog""".split()


def _word_pieces() -> Iterator[str]:
    yield "▁"
    yield from string.ascii_lowercase + string.ascii_uppercase + string.digits
    yield from string.punctuation
    for w in _WORDS:
        # every prefix is a token, so SPM's pairwise merges can always reach the whole word
        for k in range(1, len(w) + 1):
            yield "▁" + w[:k]
        yield w
    for n in itertools.count(2):  # filler: letter n-grams, with and without the word mark
        for chars in itertools.product(string.ascii_lowercase, repeat=n):
            piece = "".join(chars)
            yield piece
            yield "▁" + piece


def synthetic_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types: Gemma's special ids, newline runs, byte tokens, word pieces."""
    control, user_defined, normal, byte = 3, 4, 1, 6
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    specials += [f"<unused{i}>" for i in range(105 - len(specials))]
    specials += ["<start_of_turn>", "<end_of_turn>"]  # ids 105, 106 as in Gemma 3
    tokens = specials + ["\n" * k for k in range(1, 32)]
    types = [control] * len(specials) + [user_defined] * 31
    scores = [-1000.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [byte] * 256
    scores += [0.0] * 256
    n_fixed = len(tokens)
    if vocab_size < n_fixed + 128:
        raise ValueError(f"vocab_size must be at least {n_fixed + 128}, got {vocab_size}")
    seen = set(tokens)
    pieces = _word_pieces()
    while len(tokens) < vocab_size:
        piece = next(pieces)
        if piece not in seen:
            seen.add(piece)
            scores.append(-float(len(tokens) - n_fixed))  # earlier pieces merge first
            tokens.append(piece)
            types.append(normal)
    return tokens, scores, types


# ------------------------------------------------------------------------ metadata


def _size_label(n_params: int) -> str:
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{round(n_params / 1e6)}M"


def metadata_plan(
    *, n_embd: int, n_layers: int, n_ff: int, n_head: int, n_kv_head: int, head_dim: int,
    vocab_size: int, sliding_window: int, mix: str, context_length: int, n_params: int,
    sliding_window_pattern: int | None = None,
) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:  # fmt: skip
    """The KV pairs of a real Gemma 3 Q4_K_M file, in its order (after general.architecture)."""
    u32, f32, s, b = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, None
    arr = GGUFValueType.ARRAY
    label = _size_label(n_params)
    tokens, scores, types = synthetic_vocab(vocab_size)
    # real Gemma 3 files carry no pattern key (llama.cpp then uses period 6)
    pattern = (
        []
        if sliding_window_pattern is None
        else [("gemma3.attention.sliding_window_pattern", sliding_window_pattern, u32, b)]
    )
    return [
        ("general.type", "model", s, b),
        ("general.name", f"Synthetic Gemma 3 {label}", s, b),
        ("general.basename", "gemma-3", s, b),
        ("general.size_label", label, s, b),
        ("general.license", "gemma", s, b),
        ("general.tags", ["gemma3", "synthetic", "random-weights"], arr, s),
        ("gemma3.context_length", context_length, u32, b),
        ("gemma3.embedding_length", n_embd, u32, b),
        ("gemma3.block_count", n_layers, u32, b),
        ("gemma3.feed_forward_length", n_ff, u32, b),
        ("gemma3.attention.head_count", n_head, u32, b),
        ("gemma3.attention.layer_norm_rms_epsilon", 1e-6, f32, b),
        ("gemma3.attention.key_length", head_dim, u32, b),
        ("gemma3.attention.value_length", head_dim, u32, b),
        ("gemma3.rope.freq_base", 1e6, f32, b),
        ("gemma3.attention.sliding_window", sliding_window, u32, b),
        ("gemma3.attention.head_count_kv", n_kv_head, u32, b),
        *pattern,
        ("tokenizer.ggml.model", "llama", s, b),
        ("tokenizer.ggml.pre", "default", s, b),
        ("tokenizer.ggml.tokens", tokens, arr, s),
        ("tokenizer.ggml.scores", scores, arr, f32),
        ("tokenizer.ggml.token_type", types, arr, GGUFValueType.INT32),
        ("tokenizer.ggml.bos_token_id", 2, u32, b),
        ("tokenizer.ggml.eos_token_id", 1, u32, b),
        ("tokenizer.ggml.unknown_token_id", 3, u32, b),
        ("tokenizer.ggml.padding_token_id", 0, u32, b),
        ("tokenizer.ggml.add_bos_token", True, GGUFValueType.BOOL, b),
        ("tokenizer.ggml.add_sep_token", False, GGUFValueType.BOOL, b),
        ("tokenizer.ggml.add_eos_token", False, GGUFValueType.BOOL, b),
        ("tokenizer.ggml.add_space_prefix", False, GGUFValueType.BOOL, b),
        ("general.quantization_version", 2, u32, b),
        ("general.file_type", FILE_TYPES[mix], u32, b),
    ]


def _value_nbytes(value: Any, vtype: GGUFValueType, sub: GGUFValueType | None) -> int:
    if vtype == GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8"))
    if vtype == GGUFValueType.ARRAY:
        assert sub is not None
        if sub == GGUFValueType.STRING:
            return 4 + 8 + sum(8 + len(v.encode("utf-8")) for v in value)
        return 4 + 8 + len(value) * _value_nbytes(None, sub, None)
    return struct.calcsize(SCALAR_FORMATS[ValueType(vtype)])


def _kv_nbytes(key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None) -> int:
    return 8 + len(key.encode()) + 4 + _value_nbytes(value, vtype, sub)


def _pad(n: int) -> int:
    return -(-n // _ALIGNMENT) * _ALIGNMENT


# ------------------------------------------------------------------------ writing


def _random_tensor(rng: np.random.Generator, ne: tuple[int, ...], qtype: GGMLType) -> np.ndarray:
    """Random data for one tensor: numpy array in row-major (ne reversed) layout."""
    if len(ne) == 1:  # norm weights (Gemma stores 1 + w)
        return (1.0 + 0.05 * rng.standard_normal(ne[0])).astype(np.float32)
    rows, cols = ne[1], ne[0]
    if qtype in (GGMLType.F32, GGMLType.F16):
        dtype = np.float32 if qtype == GGMLType.F32 else np.float16
        return (0.02 * rng.standard_normal((rows, cols), dtype=np.float32)).astype(dtype)
    block_elems, block_bytes = QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_elems
    data = np.frombuffer(rng.bytes(n_blocks * block_bytes), dtype=np.uint8).copy()
    blocks = data.reshape(n_blocks, block_bytes)
    for off in _F16_FIELDS[qtype]:
        scales = rng.uniform(*_SCALE_RANGE, size=n_blocks) * _SCALE_FACTOR.get(qtype, 1.0)
        scales = scales.astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if qtype == GGMLType.Q6_K:  # int8 sub-block scales: 1..31, never 0 or negative
        blocks[:, 192:208] = rng.integers(1, 32, size=(n_blocks, 16), dtype=np.uint8)
    return data.reshape(rows, cols // block_elems * block_bytes)


def _check_args(
    kw: dict[str, int], mix: str, sliding_window: int, sliding_window_pattern: int | None
) -> None:
    extra = {"sliding_window": sliding_window, "sliding_window_pattern": sliding_window_pattern}
    for key, value in {**kw, **extra}.items():
        if key == "sliding_window_pattern" and value is None:
            continue
        minimum = 0 if key in extra else 1  # window 0: no local layers; pattern 0: all local
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if kw["n_head"] % kw["n_kv_head"]:
        raise ValueError(f"n_head ({kw['n_head']}) must be a multiple of n_kv_head")
    if kw["n_embd"] % 32 or kw["head_dim"] % 32 or kw["n_ff"] % 32:
        raise ValueError("n_embd, head_dim and n_ff must be multiples of 32")
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {MIXES}")


def _layout(
    shape: dict[str, int], sliding_window: int, mix: str, context_length: int,
    sliding_window_pattern: int | None,
) -> tuple[list, list, int, int]:  # fmt: skip
    """(metadata, tensor plan, header bytes before padding, padded data bytes)."""
    plan = tensor_plan(**shape, mix=mix)
    n_params = sum(int(np.prod(ne)) for _, ne, _ in plan)
    meta = metadata_plan(
        **shape, sliding_window=sliding_window, mix=mix, context_length=context_length,
        n_params=n_params, sliding_window_pattern=sliding_window_pattern,
    )  # fmt: skip
    header = (
        4 + 4 + 8 + 8 + _kv_nbytes("general.architecture", "gemma3", GGUFValueType.STRING, None)
    )
    header += sum(_kv_nbytes(*kv) for kv in meta)
    header += sum(8 + len(name) + 4 + 8 * len(ne) + 4 + 8 for name, ne, _ in plan)
    data = sum(_pad(int(np.prod(ne)) // QUANT_SIZES[t][0] * QUANT_SIZES[t][1]) for _, ne, t in plan)
    return meta, plan, header, data


def synthetic_file_size(
    *, sliding_window: int = 512, mix: str = "Q4_K_M", context_length: int = 32768,
    sliding_window_pattern: int | None = None, **shape: int,
) -> int:  # fmt: skip
    """Bytes of the file write_gemma3_gguf would write (without file_size padding)."""
    _check_args(shape, mix, sliding_window, sliding_window_pattern)
    _, _, header, data = _layout(shape, sliding_window, mix, context_length, sliding_window_pattern)
    return _pad(header) + data


def add_tensor_infos(writer: GGUFWriter, plan: list[tuple[str, tuple[int, ...], GGMLType]]) -> None:
    """Declare each (name, ne, qtype) of `plan` to the writer, so the data can be streamed after
    the header one tensor at a time."""
    for name, ne, qtype in plan:
        rows_shape = tuple(reversed(ne))
        if qtype in (GGMLType.F32, GGMLType.F16):
            dtype = np.float32 if qtype == GGMLType.F32 else np.float16
            nbytes = int(np.prod(ne)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, rows_shape, np.dtype(dtype), nbytes)
        else:
            block_elems, block_bytes = QUANT_SIZES[qtype]
            byte_shape = (*rows_shape[:-1], ne[0] // block_elems * block_bytes)
            writer.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                raw_dtype=GGMLQuantizationType(int(qtype)),
            )  # fmt: skip


def write_gemma3_gguf(
    path: str | Path, *, n_embd: int, n_layers: int, n_ff: int, n_head: int, n_kv_head: int,
    head_dim: int, vocab_size: int, sliding_window: int = 512, seed: int = 0,
    mix: str = "Q4_K_M", context_length: int = 32768, sliding_window_pattern: int | None = None,
    file_size: int | None = None,
) -> Path:  # fmt: skip
    """Write a random-weight Gemma 3 GGUF in the tensor-type mix `mix` (see the module doc).

    sliding_window_pattern: written as `gemma3.attention.sliding_window_pattern` when given.
    file_size: pad the metadata (a general.description string) so the file has exactly this many
    bytes, e.g. REAL_FILE_SIZES["1b"] for a twin as large as the real file.
    """
    shape = dict(
        n_embd=n_embd, n_layers=n_layers, n_ff=n_ff, n_head=n_head, n_kv_head=n_kv_head,
        head_dim=head_dim, vocab_size=vocab_size,
    )  # fmt: skip
    _check_args(shape, mix, sliding_window, sliding_window_pattern)
    meta, plan, header, data = _layout(
        shape, sliding_window, mix, context_length, sliding_window_pattern
    )
    if file_size is not None:
        key = "general.description"
        target_header = file_size - data
        n_pad = target_header - header - _kv_nbytes(key, "", GGUFValueType.STRING, None)
        if n_pad < 0 or target_header % _ALIGNMENT:
            raise ValueError(
                f"cannot pad to file_size={file_size}: tensor data alone takes {data} bytes and "
                f"the metadata {header} (the header must end on a {_ALIGNMENT}-byte boundary)"
            )
        text = "synthetic Gemma 3 with random weights, padded to the real file's size " * 2
        text = (text + " " * n_pad)[:n_pad]
        meta.append((key, text, GGUFValueType.STRING, None))

    rng = np.random.default_rng(seed)
    data = (_random_tensor(rng, ne, qtype) for _, ne, qtype in plan)
    return write_streamed(path, "gemma3", meta, plan, data)


def write_streamed(path: str | Path, arch: str, meta: list[tuple], plan: list[tuple],
                   data: Iterator[np.ndarray]) -> Path:  # fmt: skip
    """A GGUF of metadata `meta` ((key, value, type, sub_type)) and the tensors of `plan`
    ((name, ne, qtype)), whose bytes `data` yields in plan order: one tensor in memory at a time,
    so multi-GB twins stream to disk."""
    path = Path(path)
    writer = GGUFWriter(path, arch)
    for key, value, vtype, sub in meta:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    add_tensor_infos(writer, plan)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in data:
        writer.write_tensor_data(tensor)
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    from llcuda.gguf.bench_twins import BENCH_PRESETS, write_bench_gguf  # imports this module

    parser = argparse.ArgumentParser(
        prog="python -m llcuda.gguf.synthetic",
        description="Write a random-weight GGUF (Gemma 3, or a Llama / Qwen2.5 benchmark twin) in "
        "the tensor-type mix of a llama-quantize file type (Q4_K_M by default).",
    )
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--preset", choices=sorted(PRESETS) + list(BENCH_PRESETS), default="tiny")
    parser.add_argument("--mix", choices=MIXES, default="Q4_K_M",
                        help="llama-quantize file type whose tensor-type mix to copy")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pad", action="store_true", help="do not pad 270m/1b twins to the real file size"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.preset in BENCH_PRESETS:
        path = write_bench_gguf(args.out, args.preset, seed=args.seed, mix=args.mix)
        print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s")
        return
    kw: dict[str, Any] = dict(PRESETS[args.preset])
    if args.preset in REAL_FILE_SIZES and args.mix == "Q4_K_M" and not args.no_pad:
        kw["file_size"] = REAL_FILE_SIZES[args.preset]
    path = write_gemma3_gguf(args.out, seed=args.seed, mix=args.mix, **kw)
    size = path.stat().st_size
    print(f"wrote {path} ({size:,} bytes) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
