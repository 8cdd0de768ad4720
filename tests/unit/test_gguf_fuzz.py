"""Malformed GGUF files are refused at load with a GGUFError naming the problem (issue 16).

A small valid Gemma 3 file (llcuda.gguf.synthetic) is taken apart into its KV pairs and tensors by
a walker written here (independent of the reader under test), then rebuilt with targeted edits
(a wrong shape, a removed or retyped key, an unsupported tensor type) or damaged as bytes
(truncations, flips, edited counts, lengths, type ids, dims and offsets). Every mutant goes
through the metadata-level load path (reader, ModelConfig, supported types, tensor shapes,
tokenizer): it loads or raises GGUFError, nothing else, within a time and a memory bound.
A few go through the whole `llcuda.engine.loader.load` on the CPU.
"""

from __future__ import annotations

import math
import random
import re
import struct
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from llcuda.config import EngineConfig
from llcuda.gguf.constants import QUANT_SIZES, SCALAR_FORMATS, GGMLType, GGUFValueType
from llcuda.gguf.model_config import SUPPORTED_ARCHITECTURES, model_config_from_gguf
from llcuda.gguf.reader import GGUFError, GGUFFile
from llcuda.gguf.synthetic import write_gemma3_gguf
from llcuda.gguf.tensor_shapes import check_tensor_shapes
from llcuda.gguf.tokenizer import Tokenizer
from llcuda.kernels.dequant_ref import SUPPORTED_TYPES

# n_ff = 256 so ffn_down rows can hold 256-element types (Q8_K) and 64-element NVFP4
SHAPE = dict(n_embd=64, n_layers=2, n_ff=256, n_head=2, n_kv_head=1, head_dim=32, vocab_size=600)
ALIGN = 32
V = GGUFValueType
SECONDS_PER_MUTANT = 2.0  # generous: the machine's cores are shared; a mutant takes ~10 ms
PEAK_BYTES_PER_MUTANT = 64 << 20  # the file is ~100 KB; a huge count must not be allocated


# ------------------------------------------------------------------- a small GGUF, as parts


@dataclass
class KV:
    key: str
    vtype: int
    payload: bytes  # the value's bytes as stored (after the type id)


@dataclass
class Tensor:
    name: str
    ne: tuple[int, ...]
    gtype: int
    data: bytes


@dataclass
class Fields:
    """Byte positions in a serialized file, for byte-level edits."""

    n_tensors: int = 16
    n_kv: int = 8
    kv: dict[str, tuple[int, int, int]] | None = None  # key -> (key length, type, value) positions
    info: dict[str, tuple[int, int, int, int]] | None = None  # name -> (n_dims, ne0, type, offset)
    header_end: int = 0  # end of the tensor infos


def _u64(b: bytes, pos: int) -> int:
    return struct.unpack_from("<Q", b, pos)[0]


def _skip_value(b: bytes, pos: int, vtype: int) -> int:
    if vtype == V.STRING:
        return pos + 8 + _u64(b, pos)
    if vtype == V.ARRAY:
        etype, count = struct.unpack_from("<iQ", b, pos)
        pos += 12
        if etype not in (V.STRING, V.ARRAY):
            return pos + count * struct.calcsize(SCALAR_FORMATS[V(etype)])
        for _ in range(count):
            pos = _skip_value(b, pos, etype)
        return pos
    return pos + struct.calcsize(SCALAR_FORMATS[V(vtype)])


def split(content: bytes) -> tuple[list[KV], list[Tensor]]:
    """The KV pairs and tensors of a valid file (a walker of its own, not the reader under test)."""
    n_tensors, n_kv = struct.unpack_from("<qq", content, 8)
    pos, kvs = 24, []
    for _ in range(n_kv):
        n = _u64(content, pos)
        key = content[pos + 8 : pos + 8 + n].decode()
        (vtype,) = struct.unpack_from("<i", content, pos + 8 + n)
        start = pos + 12 + n
        pos = _skip_value(content, start, vtype)
        kvs.append(KV(key, vtype, content[start:pos]))
    infos = []
    for _ in range(n_tensors):
        n = _u64(content, pos)
        name = content[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", content, pos)
        ne = struct.unpack_from(f"<{n_dims}q", content, pos + 4)
        gtype, offset = struct.unpack_from("<iQ", content, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(ne), gtype, offset))
    data_start = -(-pos // ALIGN) * ALIGN
    tensors = []
    for name, ne, gtype, offset in infos:
        elems, nbytes = QUANT_SIZES[GGMLType(gtype)]
        size = math.prod(ne) // elems * nbytes
        start = data_start + offset
        tensors.append(Tensor(name, ne, gtype, content[start : start + size]))
    return kvs, tensors


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def join(kvs: list[KV], tensors: list[Tensor]) -> tuple[bytes, Fields]:
    """Serialize with fresh offsets; each tensor's data is cut or zero-padded to its new size."""
    f = Fields(kv={}, info={})
    out = bytearray(b"GGUF" + struct.pack("<Iqq", 3, len(tensors), len(kvs)))
    for kv in kvs:
        kpos = len(out)
        out += _s(kv.key) + struct.pack("<i", kv.vtype)
        f.kv[kv.key] = (kpos, len(out) - 4, len(out))
        out += kv.payload
    blobs, offset = [], 0
    for t in tensors:
        elems, nbytes = QUANT_SIZES.get(GGMLType(t.gtype), (1, 1))
        size = max(math.prod(t.ne), 0) // elems * nbytes
        data = t.data[:size].ljust(size, b"\0") + b"\0" * (-size % ALIGN)
        out += _s(t.name)
        dpos = len(out)
        out += struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}q", *t.ne)
        f.info[t.name] = (dpos, dpos + 4, len(out), len(out) + 4)
        out += struct.pack("<iQ", t.gtype, offset)
        blobs.append(data)
        offset += len(data)
    f.header_end = len(out)
    out += b"\0" * (-len(out) % ALIGN)
    return bytes(out + b"".join(blobs)), f


def encode(vtype: int, value) -> bytes:
    if vtype == V.STRING:
        return _s(value)
    if vtype == V.ARRAY:
        etype, items = value
        return struct.pack("<iQ", etype, len(items)) + b"".join(encode(etype, x) for x in items)
    return struct.pack(SCALAR_FORMATS[V(vtype)], value)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[list[KV], list[Tensor]]:
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_gemma3_gguf(path, **SHAPE, sliding_window=16, sliding_window_pattern=2, seed=0)
    kvs, tensors = split(path.read_bytes())
    content, _ = join(kvs, tensors)
    assert content == path.read_bytes()  # the walker and the serializer reproduce the file
    return kvs, tensors


def load_metadata(path: Path) -> None:
    """The load path up to the model build: everything that must refuse a bad file."""
    with GGUFFile(path) as g:
        config = model_config_from_gguf(g)
        g.check_supported(SUPPORTED_ARCHITECTURES, SUPPORTED_TYPES)
        check_tensor_shapes(g, config)
        Tokenizer.from_metadata(g.metadata)
        for name in g.tensors:  # whatever loads must be readable
            assert g.tensor_bytes(name).size == g.tensors[name].nbytes


def outcome(path: Path, content: bytes) -> str | None:
    """None if the file loads, else the GGUFError's message; anything else fails the test."""
    path.write_bytes(content)
    try:
        load_metadata(path)
    except GGUFError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------- edits


def set_kv(kvs: list[KV], key: str, vtype: int, value) -> list[KV]:
    payload = encode(vtype, value)
    out = [replace(kv, vtype=vtype, payload=payload) if kv.key == key else kv for kv in kvs]
    return out if any(kv.key == key for kv in kvs) else [*out, KV(key, vtype, payload)]


def drop_kv(kvs: list[KV], key: str) -> list[KV]:
    assert any(kv.key == key for kv in kvs), key
    return [kv for kv in kvs if kv.key != key]


def set_tensor(tensors: list[Tensor], name: str, **changes) -> list[Tensor]:
    assert any(t.name == name for t in tensors), name
    return [replace(t, **changes) if t.name == name else t for t in tensors]


def drop_tensor(tensors: list[Tensor], name: str) -> list[Tensor]:
    assert any(t.name == name for t in tensors), name
    return [t for t in tensors if t.name != name]


# (description, edit of (kvs, tensors), regex the error must match)
TARGETED = [
    ("wrong attn_q", lambda k, t: (k, set_tensor(t, "blk.0.attn_q.weight", ne=(64, 32))),
     r"tensor 'blk\.0\.attn_q\.weight' has shape \(64, 32\), expected \(64, 64\)"),
    ("head_count 3", lambda k, t: (set_kv(k, "gemma3.attention.head_count", V.UINT32, 3), t),
     r"attn_q\.weight' has shape \(64, 64\), expected \(64, 96\)"),
    ("head_count 2^31",
     lambda k, t: (set_kv(k, "gemma3.attention.head_count", V.UINT32, 2**31), t),
     r"attn_q\.weight' has shape \(64, 64\), expected \(64, 68719476736\)"),
    ("no head_count_kv", lambda k, t: (drop_kv(k, "gemma3.attention.head_count_kv"), t),
     r"attn_k\.weight' has shape \(64, 32\), expected \(64, 64\)"),
    ("block_count 2^32-1",
     lambda k, t: (set_kv(k, "gemma3.block_count", V.UINT32, 2**32 - 1), t),
     r"block_count is 4294967295, more than the 512 layers"),
    ("block_count 3", lambda k, t: (set_kv(k, "gemma3.block_count", V.UINT32, 3), t),
     r"block_count is 3 but the file has tensors for 2 blocks"),
    ("block_count 1", lambda k, t: (set_kv(k, "gemma3.block_count", V.UINT32, 1), t),
     r"block_count is 1 but the file has tensors for 2 blocks"),
    ("missing ffn_gate", lambda k, t: (k, drop_tensor(t, "blk.1.ffn_gate.weight")),
     r"missing tensor 'blk\.1\.ffn_gate\.weight' \(expected shape \(64, 256\)\)"),
    ("missing token_embd", lambda k, t: (k, drop_tensor(t, "token_embd.weight")),
     r"missing tensor 'token_embd\.weight'"),
    ("missing output_norm", lambda k, t: (k, drop_tensor(t, "output_norm.weight")),
     r"missing tensor 'output_norm\.weight' \(expected shape \(64,\)\)"),
    ("missing gemma q-norm", lambda k, t: (k, drop_tensor(t, "blk.0.attn_q_norm.weight")),
     r"missing tensor 'blk\.0\.attn_q_norm\.weight' \(expected shape \(32,\)\)"),
    ("blk.2 beyond block_count",
     lambda k, t: (k, [*t, Tensor("blk.2.attn_norm.weight", (64,), 0, b"")]),
     r"block_count is 2 but the file has tensors for 3 blocks"),
    ("blk.x", lambda k, t: (k, [*t, Tensor("blk.x.attn_norm.weight", (64,), 0, b"")]),
     r"tensor 'blk\.x\.attn_norm\.weight' has no block number"),
    ("zero dim", lambda k, t: (k, set_tensor(t, "blk.0.ffn_norm.weight", ne=(64, 0))),
     r"tensor 'blk\.0\.ffn_norm\.weight' has a zero dimension"),
    ("output wrong", lambda k, t: (k, [*t, Tensor("output.weight", (64, 599), 0, b"")]),
     r"tensor 'output\.weight' has shape \(64, 599\), expected \(64, 600\)"),
    ("rope_freqs wrong", lambda k, t: (k, [*t, Tensor("rope_freqs.weight", (32,), 0, b"")]),
     r"tensor 'rope_freqs\.weight' has shape \(32,\), expected \(16,\)"),
    ("q bias wrong", lambda k, t: (k, [*t, Tensor("blk.0.attn_k.bias", (64,), 0, b"")]),
     r"tensor 'blk\.0\.attn_k\.bias' has shape \(64,\), expected \(32,\)"),
    ("odd rope dim",
     lambda k, t: (set_kv(k, "gemma3.rope.dimension_count", V.UINT32, 31), t),
     r"gemma3\.rope\.dimension_count must be even and at most the head size 32, got 31"),
    ("key_length 0",
     lambda k, t: (set_kv(set_kv(k, "gemma3.attention.key_length", V.UINT32, 0),
                          "gemma3.attention.value_length", V.UINT32, 0), t),
     r"gemma3\.attention\.key_length must be positive, got 0"),
    ("nan eps",
     lambda k, t: (set_kv(k, "gemma3.attention.layer_norm_rms_epsilon", V.FLOAT32, math.nan), t),
     r"gemma3\.attention\.layer_norm_rms_epsilon must be finite, got nan"),
    ("head_count strings",
     lambda k, t: (set_kv(k, "gemma3.attention.head_count", V.ARRAY, (V.STRING, ["2", "2"])), t),
     r"gemma3\.attention\.head_count must be an integer or an array of integers"),
    ("negative eps",
     lambda k, t: (set_kv(k, "gemma3.attention.layer_norm_rms_epsilon", V.FLOAT32, -1.0), t),
     r"gemma3\.attention\.layer_norm_rms_epsilon must not be negative, got -1\.0"),
    ("zero rope base", lambda k, t: (set_kv(k, "gemma3.rope.freq_base", V.FLOAT32, 0.0), t),
     r"gemma3\.rope\.freq_base must be positive, got 0\.0"),
    # point 3: types we cannot compute
    *[(f"ffn_down {name}",
       lambda k, t, ty=GGMLType[name]: (k, set_tensor(t, "blk.0.ffn_down.weight", gtype=int(ty))),
       rf"unsupported tensor type: blk\.0\.ffn_down\.weight \({name}\)")
      for name in ("NVFP4", "Q8_K", "Q8_1")],
    ("I32 norm", lambda k, t: (k, set_tensor(t, "blk.1.attn_norm.weight", gtype=int(GGMLType.I32))),
     r"unsupported tensor type: blk\.1\.attn_norm\.weight \(I32\)"),
    # point 4: tokenizer metadata
    ("string bos", lambda k, t: (set_kv(k, "tokenizer.ggml.bos_token_id", V.STRING, "2"), t),
     r"tokenizer\.ggml\.bos_token_id must be an integer token id, got str"),
    ("array bos",
     lambda k, t: (set_kv(k, "tokenizer.ggml.bos_token_id", V.ARRAY, (V.UINT32, [2])), t),
     r"tokenizer\.ggml\.bos_token_id must be an integer token id, got an array of 1 uint32"),
    ("bool eos", lambda k, t: (set_kv(k, "tokenizer.ggml.eos_token_id", V.BOOL, True), t),
     r"tokenizer\.ggml\.eos_token_id must be an integer token id, got bool"),
    ("array add_bos",
     lambda k, t: (set_kv(k, "tokenizer.ggml.add_bos_token", V.ARRAY, (V.BOOL, [True])), t),
     r"tokenizer\.ggml\.add_bos_token must be a bool, got an array of 1 bool"),
    ("int add_space_prefix",
     lambda k, t: (set_kv(k, "tokenizer.ggml.add_space_prefix", V.UINT8, 1), t),
     r"tokenizer\.ggml\.add_space_prefix must be a bool, got int"),
    ("string scores",
     lambda k, t: (set_kv(k, "tokenizer.ggml.scores", V.ARRAY, (V.STRING, ["0"] * 600)), t),
     r"tokenizer\.ggml\.scores must be an array of 600 numbers \(one per token\), got an array "
     r"of 600 str"),
    ("nan score",
     lambda k, t: (set_kv(k, "tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [math.nan] * 600)), t),
     r"tokenizer\.ggml\.scores\[0\] is nan, not a finite number"),
    ("int tokens", lambda k, t: (set_kv(k, "tokenizer.ggml.tokens", V.UINT32, 600), t),
     r"tokenizer\.ggml\.tokens must be an array of strings"),
    ("number tokens",
     lambda k, t: (set_kv(k, "tokenizer.ggml.tokens", V.ARRAY, (V.INT32, list(range(600)))), t),
     r"tokenizer\.ggml\.tokens must be an array of strings"),
    ("short token_type",
     lambda k, t: (set_kv(k, "tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 599)), t),
     r"tokenizer\.ggml\.token_type must be an array of 600 integers \(one per token\), got an "
     r"array of 599 int32"),
    ("float token_type",
     lambda k, t: (set_kv(k, "tokenizer.ggml.token_type", V.ARRAY, (V.FLOAT32, [1.0] * 600)), t),
     r"tokenizer\.ggml\.token_type must be an array of 600 integers"),
    ("byte type on a word",
     lambda k, t: (set_kv(k, "tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [6] * 600)), t),
     r"tokenizer\.ggml\.token_type\[0\] marks '<pad>' as a byte token"),
    ("merges not strings",
     lambda k, t: (set_kv(k, "tokenizer.ggml.merges", V.ARRAY, (V.INT32, [1, 2])), t),
     r"tokenizer\.ggml\.merges must be an array of strings, got an array of 2 int32"),
    ("array model",
     lambda k, t: (set_kv(k, "tokenizer.ggml.model", V.ARRAY, (V.STRING, ["llama"])), t),
     r"tokenizer\.ggml\.model must be a string, got an array of 1 str"),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:divide by zero")  # key_length 0: 1/sqrt(0) before the check
@pytest.mark.parametrize("edit,match", [(e, m) for _, e, m in TARGETED],
                         ids=[d for d, _, _ in TARGETED])  # fmt: skip
def test_targeted_edit_is_refused_naming_the_problem(base, tmp_path, edit, match):
    content, _ = join(*edit(*base))
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=match):
        path = tmp_path / "m.gguf"
        path.write_bytes(content)
        load_metadata(path)
    assert time.perf_counter() - t0 < SECONDS_PER_MUTANT


def test_base_file_loads_and_out_of_range_ids_follow_llama_cpp(base, tmp_path):
    kvs, tensors = base
    assert outcome(tmp_path / "m.gguf", join(kvs, tensors)[0]) is None
    # an out-of-range id is ignored as llama.cpp does (real files carry such pad ids)
    kvs2 = set_kv(kvs, "tokenizer.ggml.padding_token_id", V.UINT32, 10**6)
    assert outcome(tmp_path / "m.gguf", join(kvs2, tensors)[0]) is None


def test_add_bos_without_a_bos_token_is_refused_at_load():
    """BPE's default BOS id 11 is outside a 4-token vocabulary: with add_bos and an out-of-range
    bos_token_id every prompt would fail, so the tokenizer refuses to build."""
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 7,
        "tokenizer.ggml.add_bos_token": True,
    }
    with pytest.raises(GGUFError, match=r"add_bos_token is set but there is no BOS token: "
                       r"tokenizer\.ggml\.bos_token_id = 7 is not an id in \[0, 4\)"):  # fmt: skip
        Tokenizer.from_metadata(md)
    md["tokenizer.ggml.bos_token_id"] = 3
    assert Tokenizer.from_metadata(md).encode("ab")[0] == 3


# ------------------------------------------------------------------- random mutants

RETYPES = [
    (V.UINT32, 7), (V.INT32, -1), (V.UINT64, 2**64 - 1), (V.FLOAT32, 0.5), (V.FLOAT64, math.inf),
    (V.BOOL, True), (V.STRING, "x"), (V.ARRAY, (V.INT32, [1, 2])), (V.ARRAY, (V.STRING, ["a"])),
    (V.ARRAY, (V.ARRAY, [(V.UINT8, [1])])), (V.ARRAY, (V.FLOAT32, [])),
]  # fmt: skip
HUGE = (2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**64 - 1)


def _poke(content: bytes, pos: int, fmt: str, value: int) -> bytes:
    """content with the field at pos set to value (two's complement: fmt's signedness is moot)."""
    b = bytearray(content)
    size = struct.calcsize(fmt)
    struct.pack_into({4: "<I", 8: "<Q"}[size], b, pos, value % (1 << (8 * size)))
    return bytes(b)


def mutants(kvs: list[KV], tensors: list[Tensor], rng: random.Random):
    """(description, file bytes): a few hundred, the same every run."""
    content, f = join(kvs, tensors)
    assert f.kv and f.info
    infos_start = min(p[0] for p in f.info.values()) - 8 - len(tensors[0].name)
    boundaries = [4, 8, 16, 24, infos_start, f.header_end, len(content)]
    boundaries += [p for kv in f.kv.values() for p in kv] + [p for i in f.info.values() for p in i]
    cuts = sorted({c + d for c in boundaries for d in (-1, 0, 1)} | {
        rng.randrange(len(content)) for _ in range(40)})  # fmt: skip
    for cut in rng.sample(cuts, 90):
        if 0 <= cut < len(content):
            yield f"truncated at {cut}", content[:cut]
    for i in range(110):  # byte flips in the header, KV and tensor-info region
        b = bytearray(content)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(4, f.header_end)] = rng.randrange(256)
        yield f"flips #{i}", bytes(b)
    for what, fmt, pos in (("tensor count", "<q", 8), ("metadata count", "<q", 16)):
        for v in (-1, 0, 1, len(tensors) + 1, len(kvs) - 1, *HUGE):
            yield f"{what} = {v}", _poke(content, pos, fmt, v)
    for key in rng.sample(sorted(f.kv), 12):
        kpos, tpos, vpos = f.kv[key]
        yield f"{key}: key length huge", _poke(content, kpos, "<Q", rng.choice(HUGE))
        yield f"{key}: key length + 1", _poke(content, kpos, "<Q", len(key) + 1)
        t = rng.choice([-1, 13, 99, *range(13)])
        yield f"{key}: value type {t}", _poke(content, tpos, "<i", t)
        vtype = next(kv.vtype for kv in kvs if kv.key == key)
        if vtype in (V.STRING, V.ARRAY):  # string length or array count
            off = vpos + (4 if vtype == V.ARRAY else 0)
            v = rng.choice([*HUGE, 0, 1])
            yield f"{key}: length {v}", _poke(content, off, "<Q", v)
        if vtype == V.ARRAY:
            t = rng.choice([-1, 13, *range(13)])
            yield f"{key}: element type {t}", _poke(content, vpos, "<i", t)
    for name in rng.sample(sorted(f.info), 12):
        npos, dpos, tpos, opos = f.info[name]
        yield f"{name}: n_dims", _poke(content, npos, "<I", rng.choice([0, 3, 4, 5, 2**32 - 1]))
        v = rng.choice([0, -1, 1, 31, 2**31, 2**62, 2**63 - 1, -(2**63)])
        yield f"{name}: ne0 = {v}", _poke(content, dpos, "<q", v)
        t = rng.choice([4, 5, 31, 36, 43, 99, -1, *range(0, 43, 3)])
        yield f"{name}: type {t}", _poke(content, tpos, "<i", t)
        offset = struct.unpack_from("<Q", content, opos)[0]
        for v in (offset + 1, offset + ALIGN, offset - ALIGN, 0, 2**63, rng.choice(HUGE)):
            yield f"{name}: offset {v}", _poke(content, opos, "<Q", v)
    for kv in rng.sample(kvs, 20):
        yield f"drop {kv.key}", join([k for k in kvs if k is not kv], tensors)[0]
        vtype, value = rng.choice(RETYPES)
        yield f"retype {kv.key} as {V(vtype).name} {value!r:.20}", join(
            set_kv(kvs, kv.key, vtype, value), tensors)[0]  # fmt: skip
    for t in rng.sample(tensors, 10):
        yield f"drop tensor {t.name}", join(kvs, [x for x in tensors if x is not t])[0]
        ne = tuple(d * rng.choice([0, 2]) if i == 1 else d for i, d in enumerate(t.ne))
        yield f"{t.name} ne {ne}", join(kvs, set_tensor(tensors, t.name, ne=ne))[0]


def test_every_mutant_loads_or_raises_gguf_error(base, tmp_path):
    path = tmp_path / "m.gguf"
    refused = loaded = 0
    slowest = (0.0, "")
    tracemalloc.start()
    try:
        for desc, content in mutants(*base, random.Random(16)):
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            try:
                msg = outcome(path, content)
            except Exception as exc:  # the point of the test: nothing but GGUFError escapes
                pytest.fail(f"mutant {desc!r} raised {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            assert elapsed < SECONDS_PER_MUTANT, f"mutant {desc!r} took {elapsed:.2f} s"
            assert peak < PEAK_BYTES_PER_MUTANT, f"mutant {desc!r} allocated {peak >> 20} MiB"
            slowest = max(slowest, (elapsed, desc))
            refused += msg is not None
            loaded += msg is None
    finally:
        tracemalloc.stop()
    assert refused + loaded >= 300 and refused > loaded, (refused, loaded, slowest)


# ------------------------------------------------------------------- the real loader and the CLI

LOADER_MUTANTS = ["wrong attn_q", "no head_count_kv", "block_count 2^32-1", "ffn_down Q8_K",
                  "I32 norm", "string bos", "missing ffn_gate"]  # fmt: skip


def test_loader_refuses_bad_files_and_loads_the_good_one(base, tmp_path):
    from llcuda.engine.loader import load

    config = EngineConfig(device="cpu", ctx_size=64, batch_size=32, ubatch_size=8, block_size=4)
    path = tmp_path / "good.gguf"
    path.write_bytes(join(*base)[0])
    loaded = load(str(path), config, verbose=False)
    assert loaded.model_config.num_layers == 2 and loaded.tokenizer.vocab_size == 600
    loaded.close()
    edits = {d: (e, m) for d, e, m in TARGETED}
    for desc in LOADER_MUTANTS:
        edit, match = edits[desc]
        path.write_bytes(join(*edit(*base))[0])
        t0 = time.perf_counter()
        with pytest.raises(GGUFError, match=match):
            load(str(path), config, verbose=False)
        assert time.perf_counter() - t0 < SECONDS_PER_MUTANT, desc


@pytest.mark.parametrize("desc", ["head_count 2^31", "ffn_down NVFP4", "array add_bos"])
def test_cli_prints_one_error_line(base, tmp_path, capsys, monkeypatch, desc):
    from llcuda.cli import main

    monkeypatch.delenv("LLCUDA_DEBUG", raising=False)
    edit, match = {d: (e, m) for d, e, m in TARGETED}[desc]
    path = tmp_path / "bad.gguf"
    path.write_bytes(join(*edit(*base))[0])
    assert main(["generate", "-m", str(path), "--device", "cpu", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llcuda: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


# ------------------------------------------------------------------- other architectures' layouts


def _shapes_error(tmp_path: Path, tensors: list[Tensor], kvs: list[KV], arch: str) -> str | None:
    """check_tensor_shapes under `arch` (the config read as gemma3, then relabelled with the
    norms that architecture's reader sets)."""
    path = tmp_path / "a.gguf"
    path.write_bytes(join(kvs, tensors)[0])
    with GGUFFile(path) as g:
        config = replace(model_config_from_gguf(g), architecture=arch,
                         qk_norm=arch in ("gemma3", "qwen3"),
                         post_norms=arch in ("gemma2", "gemma3"))  # fmt: skip
        try:
            check_tensor_shapes(g, config)
        except GGUFError as exc:
            return str(exc)
    return None


def test_fused_qkv_and_gate_up_layouts(base, tmp_path):
    """phi3: attn_qkv [n_embd, (n_head + 2 n_kv_head) head_dim], ffn_up [n_embd, 2 n_ff], no
    ffn_gate; llama: no Gemma norms; qwen2: q/k/v biases."""
    kvs, tensors = base
    fused = []
    for t in tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        i = t.name.split(".")[1] if kind else ""
        if kind in ("attn_q", "attn_k", "ffn_gate", "attn_q_norm", "attn_k_norm",
                    "post_attention_norm", "post_ffw_norm"):  # fmt: skip
            continue
        if kind == "attn_v":
            t = Tensor(f"blk.{i}.attn_qkv.weight", (64, 64 + 2 * 32), 0, b"")
        elif kind == "ffn_up":
            t = Tensor(t.name, (64, 2 * 256), 0, b"")
        fused.append(t)
    assert _shapes_error(tmp_path, fused, kvs, "phi3") is None
    bad = set_tensor(fused, "blk.1.attn_qkv.weight", ne=(64, 96))
    assert "'blk.1.attn_qkv.weight' has shape (64, 96), expected (64, 128)" in _shapes_error(
        tmp_path, bad, kvs, "phi3")  # fmt: skip
    assert "missing tensor 'blk.0.ffn_gate.weight'" in _shapes_error(tmp_path, fused, kvs, "llama")
    # llama reads no Gemma norms: without them the Gemma layout passes as llama, not as gemma3
    plain = [t for t in tensors if not t.name.endswith(("q_norm.weight", "k_norm.weight",
             "post_attention_norm.weight", "post_ffw_norm.weight"))]  # fmt: skip
    assert _shapes_error(tmp_path, plain, kvs, "llama") is None
    assert "missing tensor 'blk.0.ffn_norm.weight'" in _shapes_error(
        tmp_path, drop_tensor(plain, "blk.0.ffn_norm.weight"), kvs, "llama")  # fmt: skip
    biased = [*plain, Tensor("blk.0.attn_q.bias", (64,), 0, b""),
              Tensor("blk.0.attn_v.bias", (32,), 0, b"")]  # fmt: skip
    assert _shapes_error(tmp_path, biased, kvs, "qwen2") is None
    biased = set_tensor(biased, "blk.0.attn_q.bias", ne=(32,))
    assert "'blk.0.attn_q.bias' has shape (32,), expected (64,)" in _shapes_error(
        tmp_path, biased, kvs, "qwen2")  # fmt: skip
