"""GGUFFile: files written by gguf-py's GGUFWriter, hand-made corrupt files, the real model."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llcuda.gguf.constants import GGMLType, GGUFValueType
from llcuda.gguf.reader import GGUFError, GGUFFile, UnsupportedModelError


def write_small(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A small GGUF written by gguf-py: every KV type, an F32 2-D, an F16 3-D and a Q8_0 tensor."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.strs", ["a", "", "▁the", "<0x0A>"])
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "q.weight": rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8),
        "n.weight": rng.standard_normal(7).astype(np.float32),
    }
    for name, arr in tensors.items():
        if name == "q.weight":
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture()
def small(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "small.gguf"
    return path, write_small(path)


def test_metadata_values(small):
    path, _ = small
    with GGUFFile(path) as g:
        m = g.metadata
        assert g.version == 3 and g.architecture == "llama" and g.alignment == 32
        assert m["t.u8"] == 200 and m["t.i8"] == -5 and m["t.u16"] == 60000
        assert m["t.i16"] == -30000 and m["t.u32"] == 4_000_000_000
        assert m["t.i32"] == -2_000_000_000 and m["t.u64"] == 2**63 + 5 and m["t.i64"] == -(2**62)
        assert m["t.f32"] == float(np.float32(0.1)) and m["t.f64"] == 0.1
        assert m["t.bool"] is True
        assert m["t.str"] == "héllo ▁wörld"
        assert m["t.strs"] == ["a", "", "▁the", "<0x0A>"]
        assert isinstance(m["t.ints"], np.ndarray) and m["t.ints"].tolist() == [1, 2, 3]
        assert m["t.floats"].tolist() == [0.5, -1.25]
        assert m["t.bools"].dtype == bool and m["t.bools"].tolist() == [True, False, True]
        assert [list(x) for x in m["t.nested"]] == [[1, 2], [3]]


def test_tensor_infos_and_bytes_match_writer_and_gguf_reader(small):
    path, tensors = small
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as g:
        assert list(g.tensors) == list(tensors)
        assert g.data_offset == ref.data_offset
        for rt in ref.tensors:
            info = g.tensors[rt.name]
            assert info.shape == tuple(int(x) for x in rt.shape)
            assert info.ggml_type == GGMLType(int(rt.tensor_type))
            assert info.offset == rt.data_offset and info.nbytes == rt.n_bytes
            assert info.n_elements == rt.n_elements
            assert info.offset % g.alignment == 0
        a = g.tensors["a.weight"]
        assert a.shape == (5, 3) and a.rows_cols == (3, 5) and a.ggml_type == GGMLType.F32
        b = g.tensors["b.weight"]
        assert b.shape == (4, 3, 2) and b.rows_cols == (6, 4)
        q = g.tensors["q.weight"]
        assert q.ggml_type == GGMLType.Q8_0 and q.shape == (64, 4) and q.row_bytes == 68
        for name, arr in tensors.items():
            raw = g.tensor_bytes(name)
            assert raw.dtype == np.uint8 and not raw.flags.writeable and not raw.flags.owndata
            assert raw.tobytes() == arr.tobytes()


def test_custom_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    tensors = write_small(path, alignment=64)
    with GGUFFile(path) as g:
        assert g.alignment == 64 and g.data_offset % 64 == 0
        for name, arr in tensors.items():
            assert g.tensors[name].offset % 64 == 0
            assert g.tensor_bytes(name).tobytes() == arr.tobytes()


def test_close_and_views_outlive_it(small):
    path, tensors = small
    g = GGUFFile(path)
    view = g.tensor_bytes("a.weight")
    g.close()
    g.close()  # idempotent
    assert view.tobytes() == tensors["a.weight"].tobytes()
    with pytest.raises(GGUFError, match="closed"):
        g.tensor_bytes("a.weight")
    with pytest.raises(KeyError, match="nope"):
        g.tensor_bytes("nope")


def test_check_supported(small):
    path, _ = small
    with GGUFFile(path) as g:
        g.check_supported(["llama"], [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0])
        with pytest.raises(UnsupportedModelError, match="architecture 'llama'"):
            g.check_supported(["gemma3"], list(GGMLType))
        with pytest.raises(UnsupportedModelError, match=r"q\.weight \(Q8_0\)"):
            g.check_supported(["llama"], [GGMLType.F32, GGMLType.F16])


# ------------------------------------------------------------------- hand-made files and errors


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def make_gguf(
    kv: list[tuple[str, int, bytes]] | None = None,
    tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None,
    data: bytes = b"",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    kv = kv if kv is not None else [("general.architecture", 8, s("gemma3"))]
    tensors = tensors or []
    out = b"GGUF" + struct.pack(
        "<Iqq",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kv) if n_kv is None else n_kv,
    )
    for key, vtype, payload in kv:
        out += s(key) + struct.pack("<i", vtype) + payload
    for name, ne, gtype, offset in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
        out += struct.pack("<iQ", gtype, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


def parse(tmp_path: Path, content: bytes) -> GGUFFile:
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    return GGUFFile(p)


def test_hand_made_file_parses(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    g = parse(tmp_path, make_gguf(tensors=[("w", (4, 2), 0, 0)], data=data))
    assert g.tensors["w"].rows_cols == (2, 4)
    assert g.tensor_bytes("w").view(np.float32).tolist() == list(range(8))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file") as e:
        GGUFFile(tmp_path / "missing.gguf")
    assert "missing.gguf" in str(e.value)
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


def test_not_gguf_names_first_bytes(tmp_path):
    with pytest.raises(GGUFError, match=r"not a GGUF file \(first bytes b'PK\\x03\\x04'") as e:
        parse(tmp_path, b"PK\x03\x04" + b"\0" * 100)
    assert str(tmp_path / "x.gguf") in str(e.value)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        parse(tmp_path, b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        parse(tmp_path, b"GG")


@pytest.mark.parametrize("version", [0, 1, 4, 3 << 24])
def test_unsupported_version(tmp_path, version):
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}"):
        parse(tmp_path, make_gguf(version=version))


def test_version_2_accepted(tmp_path):
    assert parse(tmp_path, make_gguf(version=2)).version == 2


def test_big_endian_hint(tmp_path):
    with pytest.raises(GGUFError, match="big-endian"):
        parse(tmp_path, make_gguf(version=3 << 24))


@pytest.mark.parametrize(
    "n_kv,n_tensors,match",
    [
        (2**62, 0, "absurd metadata count"),
        (-1, 0, "absurd metadata count"),
        (1, 2**40, "absurd tensor count"),
        (1, -3, "absurd tensor count"),
    ],
)
def test_absurd_counts(tmp_path, n_kv, n_tensors, match):
    with pytest.raises(GGUFError, match=match):
        parse(tmp_path, make_gguf(n_kv=n_kv, n_tensors=n_tensors))


def test_absurd_string_and_array_lengths(tmp_path):
    kv = [("k", 8, struct.pack("<Q", 2**60) + b"abc")]
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match="truncated file: metadata 'k' needs 1152921504606846976"):
        parse(tmp_path, make_gguf(kv=kv))
    kv = [("k", 9, struct.pack("<iQ", 8, 2**61))]
    with pytest.raises(GGUFError, match="array of 2305843009213693952 STRING elements cannot fit"):
        parse(tmp_path, make_gguf(kv=kv))
    kv = [("k", 9, struct.pack("<iQ", 6, 10**12))]
    with pytest.raises(GGUFError, match="cannot fit"):
        parse(tmp_path, make_gguf(kv=kv))
    assert time.perf_counter() - t0 < 1.0


def test_unknown_value_types(tmp_path):
    with pytest.raises(GGUFError, match="unknown value type 13 for metadata 'k'"):
        parse(tmp_path, make_gguf(kv=[("k", 13, b"\0" * 8)]))
    with pytest.raises(GGUFError, match="unknown array element type 99 for metadata 'k'"):
        parse(tmp_path, make_gguf(kv=[("k", 9, struct.pack("<iQ", 99, 1))]))


def test_duplicate_key_and_bad_alignment(tmp_path):
    kv = [("a", 4, struct.pack("<I", 1)), ("a", 4, struct.pack("<I", 2))]
    with pytest.raises(GGUFError, match="duplicate metadata key 'a'"):
        parse(tmp_path, make_gguf(kv=kv))
    with pytest.raises(GGUFError, match="general.alignment must be a power of two, got 48"):
        parse(tmp_path, make_gguf(kv=[("general.alignment", 4, struct.pack("<I", 48))]))


def test_tensor_errors(tmp_path):
    data = b"\0" * 64
    with pytest.raises(GGUFError, match="tensor 'w' has unknown ggml type id 4"):
        parse(tmp_path, make_gguf(tensors=[("w", (32,), 4, 0)], data=data))
    with pytest.raises(GGUFError, match="ne\\[0\\]=40 is not a multiple of the block size 32"):
        parse(tmp_path, make_gguf(tensors=[("w", (40, 2), int(GGMLType.Q4_0), 0)], data=data))
    with pytest.raises(GGUFError, match="tensor 'w' has 5 dimensions"):
        parse(tmp_path, make_gguf(tensors=[("w", (1, 1, 1, 1, 1), 0, 0)], data=data))
    with pytest.raises(GGUFError, match="negative dimension"):
        parse(tmp_path, make_gguf(tensors=[("w", (4, -1), 0, 0)], data=data))
    with pytest.raises(GGUFError, match="duplicate tensor name 'w'"):
        parse(tmp_path, make_gguf(tensors=[("w", (4,), 0, 0), ("w", (4,), 0, 32)], data=data))
    with pytest.raises(GGUFError, match="offset 8 is not a multiple of the alignment 32"):
        parse(tmp_path, make_gguf(tensors=[("w", (4,), 0, 8)], data=data))
    with pytest.raises(GGUFError, match="truncated file: tensor 'big' data"):
        parse(tmp_path, make_gguf(tensors=[("ok", (4,), 0, 0), ("big", (64,), 0, 32)], data=data))


def test_every_truncation_is_a_gguf_error(tmp_path):
    path = tmp_path / "small.gguf"
    write_small(path)
    content = path.read_bytes()
    with GGUFFile(path) as g:
        data_end = max(t.offset + t.nbytes for t in g.tensors.values())
    for cut in range(0, data_end):
        with pytest.raises(GGUFError) as e:
            parse(tmp_path, content[:cut])
        msg = str(e.value)
        assert "x.gguf" in msg and (
            "truncated" in msg or "not a GGUF" in msg or "absurd" in msg or "cannot fit" in msg
        ), (cut, msg)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruption_never_crashes(tmp_path, data):
    path = tmp_path / "small.gguf"
    if not path.exists():
        write_small(path)
    content = bytearray(path.read_bytes())
    with GGUFFile(path) as g:
        header_end = g.data_offset - 1  # corrupt the KV and tensor-info region
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(4, header_end))
        content[pos] = data.draw(st.integers(0, 255))
    try:
        g = parse(tmp_path, bytes(content))
    except GGUFError:
        return
    for name in g.tensors:  # whatever parsed must be readable
        assert g.tensor_bytes(name).size == g.tensors[name].nbytes


# ------------------------------------------------------------------- the real model


def test_real_model(real_model_path):
    t0 = time.perf_counter()
    g = GGUFFile(real_model_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"parsing took {elapsed:.2f} s"
    m = g.metadata
    assert g.version == 3 and g.architecture == "gemma3" and g.alignment == 32
    assert g.data_offset == 6525120
    assert len(g.tensors) == 236 and len(m) == 33
    tokens = m["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144 and tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert all(isinstance(t, str) for t in tokens[::1000])
    scores = m["tokenizer.ggml.scores"]
    assert scores.dtype == np.float32 and len(scores) == 262144
    assert m["tokenizer.ggml.token_type"].dtype == np.int32
    assert m["gemma3.attention.sliding_window"] == 512 and m["gemma3.block_count"] == 18
    emb = g.tensors["token_embd.weight"]
    assert emb.shape == (640, 262144) and emb.ggml_type == GGMLType.Q8_0
    assert emb.offset == 6527680 and emb.nbytes == 178257920 and emb.rows_cols == (262144, 640)
    last = max(g.tensors.values(), key=lambda t: t.offset)
    assert last.offset + last.nbytes == g.file_size
    assert {t.ggml_type for t in g.tensors.values()} == {
        GGMLType.F32,
        GGMLType.Q5_0,
        GGMLType.Q4_K,
        GGMLType.Q8_0,
        GGMLType.Q6_K,
    }
    raw = g.tensor_bytes("token_embd.weight")
    assert raw.size == emb.nbytes and not raw.flags.owndata
    g.check_supported(
        ["gemma3"], [GGMLType.F32, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q6_K]
    )
    g.close()


def test_value_type_ids():
    assert GGUFValueType.STRING == 8 and GGUFValueType.ARRAY == 9 and GGUFValueType.FLOAT64 == 12
    assert GGMLType.Q4_K == 12 and GGMLType.BF16 == 30 and GGMLType.IQ4_XS == 23


# ------------------------------------------------------------------- data layout and dimensions


def test_zero_and_overflowing_dimensions(tmp_path):
    data = b"\0" * 32
    with pytest.raises(GGUFError, match=r"tensor 'w' has a zero dimension: \(4, 0\)"):
        parse(tmp_path, make_gguf(tensors=[("w", (4, 0), 0, 0)], data=data))
    # 2**62 * 4 elements: the product overflows int64 (ggml's ne and nbytes would wrap)
    with pytest.raises(GGUFError, match=r"tensor 'w': dimensions \(4, 4611686018427387904\) over"):
        parse(tmp_path, make_gguf(tensors=[("w", (4, 2**62), 0, 0)], data=data))
    # fits int64 but not the file
    with pytest.raises(GGUFError, match="truncated file: tensor 'w' data"):
        parse(tmp_path, make_gguf(tensors=[("w", (2**20, 2**20), 0, 0)], data=data))


def test_overlapping_tensor_data(tmp_path):
    data = b"\0" * 64
    tensors = [("a", (8,), 0, 0), ("b", (8,), 0, 0)]  # both at offset 0
    with pytest.raises(GGUFError, match=r"tensor 'b' data \[\d+, \d+\) overlaps tensor 'a'"):
        parse(tmp_path, make_gguf(tensors=tensors, data=data))
    tensors = [("a", (16,), 0, 0), ("b", (8,), 0, 32)]  # a is 64 bytes: b starts inside it
    with pytest.raises(GGUFError, match="overlaps tensor 'a'"):
        parse(tmp_path, make_gguf(tensors=tensors, data=data + b"\0" * 32))
    tensors = [("a", (8,), 0, 0), ("b", (8,), 0, 32)]  # back to back: fine
    g = parse(tmp_path, make_gguf(tensors=tensors, data=data))
    assert g.tensors["b"].offset == g.tensors["a"].offset + 32


def test_misaligned_data_start(tmp_path):
    """A file written with alignment 32 whose general.alignment says 16: the data start we compute
    lands 16 bytes early and every tensor would read shifted bytes; the unexplained tail says so."""
    kv = [("general.alignment", 4, struct.pack("<I", 16))]
    data = np.arange(8, dtype=np.float32).tobytes()
    good = make_gguf(kv=kv, tensors=[("w", (8,), 0, 0)], data=data)
    assert parse(tmp_path, good).tensors["w"].nbytes == 32  # the consistent file parses
    header_end = len(good) - len(data)
    # the writer padded the header to 32 bytes, 16 more than alignment 16 accounts for
    shifted = good[:header_end] + b"\0" * 16 + data
    with pytest.raises(GGUFError, match="16 bytes unaccounted for .*general.alignment 16"):
        parse(tmp_path, shifted)
    # trailing bytes short of the alignment are padding and accepted
    assert parse(tmp_path, good + b"\0" * 15).tensors["w"].nbytes == 32
    with pytest.raises(GGUFError, match="bytes unaccounted for"):
        parse(tmp_path, good + b"\0" * 16)


def test_deep_array_nesting_is_refused(tmp_path):
    # arrays of arrays nested 9 deep (the limit is 8), each of length 1
    payload = struct.pack("<iQ", 9, 1) * 9 + struct.pack("<iQ", 4, 1) + struct.pack("<I", 7)
    with pytest.raises(GGUFError, match="metadata 'k': arrays nested deeper than 8"):
        parse(tmp_path, make_gguf(kv=[("k", 9, payload)]))
    payload = struct.pack("<iQ", 9, 1) * 7 + struct.pack("<iQ", 4, 1) + struct.pack("<I", 7)
    value = parse(tmp_path, make_gguf(kv=[("k", 9, payload)])).metadata["k"]
    for _ in range(8):
        (value,) = value
    assert value == 7
