"""The C++ CPU fast path (quant_cpu_native) against the specification, dequantize_ref + matmul.

It decodes each block as scale * u + offset and multiplies with fp32 x, so it may differ from
x @ dequantize_ref(W).T only by fp32 rounding: within 1e-5 of the sum of |products| (2^-17; a
wrong nibble, bit or scale is off by whole weights). Outputs are the same for any thread count
and any batching of the tokens (each output is one row's sum in a fixed order). With int8_x
(a decode step's blocks, LLCUDA_CPU_INT8) it quantizes x as q8_activations.quantize_q8_ref,
bit for bit, and the bound holds against quantize_q8_ref(x) @ dequantize_ref(W).T.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.kernels import ops
from llcuda.kernels import quant_cpu_native as qn
from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.kernels.q8_activations import quantize_q8_ref
from llcuda.layers.quant_tensor import QuantTensor
from tests.unit.test_quant_matmul_cpu import weight

TYPES = sorted(qn.NATIVE_TYPES)


@pytest.fixture(scope="module")
def native():
    module = qn.load_native()
    if module is None:
        pytest.skip("the CPU extension could not be built here (no compiler)")
    return module


def assert_matmul_close(got: torch.Tensor, x: torch.Tensor, w: QuantTensor) -> None:
    w64 = dequantize_ref(w.data, w.qtype).double()
    err = (got.double() - x.double() @ w64.T).abs()
    bound = (x.double().abs() @ w64.abs().T) * 1e-5
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("int8_x", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 3, 4, 9])
def test_matches_dequantized_reference(native, qtype, num_tokens, int8_x):
    w = weight(qtype, 45, 3, seed=num_tokens)
    x = torch.randn(num_tokens, w.shape[1], generator=torch.Generator().manual_seed(num_tokens))
    got = qn.quant_matmul_native(x, w, int8_x=int8_x)
    assert got is not None and got.dtype == torch.float32 and got.shape == (num_tokens, 45)
    assert_matmul_close(got, quantize_q8_ref(x) if int8_x else x, w)


def test_int8_is_not_fp32(native):
    # the int8 path really quantizes: its outputs sit at the int8 spec, away from fp32's
    w = weight(GGMLType.Q4_K, 64, 2, seed=5)
    x = torch.randn(2, w.shape[1])
    w32 = dequantize_ref(w.data, w.qtype)
    got = qn.quant_matmul_native(x, w, int8_x=True)
    to_spec = (got - quantize_q8_ref(x) @ w32.T).abs().max()
    assert to_spec < 1e-2 * (got - x @ w32.T).abs().max()


@pytest.mark.parametrize("int8_x", [False, True], ids=["fp32", "int8"])
def test_tokens_are_independent_of_their_batch(native, int8_x):
    # a token's output does not depend on the others in the call (chunked prefill = one pass)
    w = weight(GGMLType.Q6_K, 33, 2, seed=3)
    x = torch.randn(11, w.shape[1])
    full = qn.quant_matmul_native(x, w, int8_x=int8_x)
    parts = [qn.quant_matmul_native(x[i : i + 3], w, int8_x=int8_x) for i in range(0, 11, 3)]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_one_hot_rows_give_the_columns(native, qtype):
    # each output is one weight, to fp32 rounding of the form scale * u + offset
    w = weight(qtype, 6, 2, seed=7)
    x = torch.eye(w.shape[1])
    got = qn.quant_matmul_native(x, w)
    expected = dequantize_ref(w.data, qtype).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(native, threads):
    # many rows (several chunks for the pool), odd token count (a partial tile)
    w = weight(GGMLType.Q4_K, 700, 2, seed=1)
    x = torch.randn(5, w.shape[1])
    prev = torch.get_num_threads()
    try:
        qn.set_num_threads(1)
        one = qn.quant_matmul_native(x, w)
        qn.set_num_threads(threads)
        assert native.get_num_threads() == threads
        assert torch.equal(qn.quant_matmul_native(x, w), one)  # same sums, any split
    finally:
        qn.set_num_threads(prev)


def test_real_model_tensors(native, real_model_path):
    from llcuda.gguf.reader import GGUFFile

    g = GGUFFile(real_model_path)
    try:
        seen = set()
        for name, info in g.tensors.items():
            if info.ggml_type in qn.NATIVE_TYPES and info.ggml_type not in seen:
                seen.add(info.ggml_type)
                w = QuantTensor.from_gguf(g, name)
                rows = QuantTensor(w.data[:200], w.qtype, (200, w.shape[1]))
                x = torch.randn(2, w.shape[1])
                assert_matmul_close(qn.quant_matmul_native(x, rows), x, rows)
        assert seen == {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K}
    finally:
        g.close()


def test_ops_dispatch_and_the_off_switch(native, monkeypatch):
    w = weight(GGMLType.Q5_0, 9, 2, seed=2)
    x = torch.randn(2, 64)
    assert torch.equal(ops.quant_matmul(x, w), qn.quant_matmul_native(x, w))
    monkeypatch.setenv("LLCUDA_NATIVE_CPU", "0")
    assert qn.quant_matmul_native(x, w) is None
    from llcuda.kernels.quant_matmul_cpu import quant_matmul_cpu

    assert torch.equal(ops.quant_matmul(x, w), quant_matmul_cpu(x, w))  # the torch path


def test_long_batches_take_the_mkl_path_on_n_threads(native):
    w = weight(GGMLType.Q5_0, 20, 2, seed=6)
    x = torch.randn(qn.MKL_TOKENS, 64)
    prev = torch.get_num_threads()
    try:
        qn.set_num_threads(2)
        with qn.torch_ops_on_one_thread():
            assert torch.get_num_threads() == 1
            got = qn.quant_matmul_native(x, w)
            assert torch.get_num_threads() == 1  # restored after the GEMM's 2 threads
        assert torch.equal(got, qn.dequant_matmul(native, x, w))
        assert_matmul_close(got, x, w)
        assert_matmul_close(qn.quant_matmul_native(x[:-1], w), x[:-1], w)  # the C++ kernel
    finally:
        qn.set_num_threads(prev)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_the_reference(native, qtype):
    # the matmuls' own decoders write the weights out (a prompt's tiles for MKL)
    w = weight(qtype, 37, 3, seed=2)
    out = torch.empty(w.shape)
    native.dequantize(w.data, int(qtype), out)
    torch.testing.assert_close(out, dequantize_ref(w.data, qtype), rtol=1e-6, atol=0)


def test_dequant_matmul_in_tiles(native, monkeypatch):
    monkeypatch.setattr(qn, "TILE_ELEMS", 3 * 512)  # tiles of 3 rows, the last one short
    w = weight(GGMLType.IQ2_XS, 10, 2, seed=4)
    x = torch.randn(5, w.shape[1])
    assert_matmul_close(qn.dequant_matmul(native, x, w), x, w)


def test_every_quantized_type_is_native_and_floats_fall_back(native):
    from llcuda.kernels.dequant_ref import _BLOCK_DECODERS

    assert set(_BLOCK_DECODERS) == qn.NATIVE_TYPES  # every block type the reference decodes
    w = QuantTensor(torch.zeros(3, 64, dtype=torch.uint8), GGMLType.F16, (3, 32))
    assert qn.quant_matmul_native(torch.randn(1, 32), w) is None  # the reference path's


def test_bad_input_is_named(native):
    w = weight(GGMLType.Q8_0, 2, 1)
    with pytest.raises(ValueError, match="num_tokens, 32"):
        qn.quant_matmul_native(torch.randn(1, 31), w)
    with pytest.raises(RuntimeError, match="out must be"):
        native.quant_matmul(torch.randn(1, 32), w.data, int(GGMLType.Q8_0), torch.empty(1, 3))
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        native.quant_matmul(torch.randn(1, 32), w.data, int(GGMLType.F16), torch.empty(1, 2))
    with pytest.raises(ValueError, match="n_threads"):
        qn.set_num_threads(0)


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    # a compiler that cannot run: one warning, then None (the torch path), never an exception
    monkeypatch.setattr(qn, "_state", {})
    monkeypatch.setenv("LLCUDA_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(qn, "_SOURCE", tmp_path / "missing.cpp")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert qn.load_native() is None
    assert qn.load_native() is None  # no second warning, no retry
    w = weight(GGMLType.Q8_0, 2, 1)
    assert qn.quant_matmul_native(torch.randn(1, 32), w) is None


def test_n_threads_knob():
    from llcuda.cli import build_parser
    from llcuda.config import EngineConfig

    assert EngineConfig(n_threads=3).n_threads == 3 and EngineConfig().n_threads is None
    with pytest.raises(ValueError, match="n_threads"):
        EngineConfig(n_threads=0)
    assert 1 <= qn.physical_cores() <= (os.cpu_count() or 1)
    args = build_parser().parse_args(["bench", "m.gguf", "-t", "2"])
    assert args.threads == 2


_VARIANT_CHECK = """
import sys, torch
from llcuda.kernels import quant_cpu_native as qn
from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.kernels.q8_activations import quantize_q8_ref
from tests.unit.test_quant_cpu_native import assert_matmul_close, weight
qn._CFLAGS = ["-O3", *sys.argv[1].split(), *qn._CFLAGS[2:]]
native = qn.load_native()
assert native is not None and [native.has_avx2(), native.has_avx512()] == eval(sys.argv[2])
for qtype in sorted(qn.NATIVE_TYPES):
    for tokens in (1, 3, 4, 9):
        w = weight(qtype, 45, 3, seed=tokens)
        x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(tokens))
        assert_matmul_close(qn.quant_matmul_native(x, w), x, w)
        assert_matmul_close(qn.quant_matmul_native(x, w, int8_x=True), quantize_q8_ref(x), w)
    out = torch.empty(w.shape)
    native.dequantize(w.data, int(qtype), out)
    torch.testing.assert_close(out, dequantize_ref(w.data, qtype), rtol=1e-6, atol=0)
    x = torch.eye(w.shape[1])
    want = dequantize_ref(w.data, qtype).T
    torch.testing.assert_close(qn.quant_matmul_native(x, w), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
def test_avx2_and_scalar_builds_match_the_reference(native, tmp_path):
    # the host builds its widest kernels (AVX-512 or AVX2); the AVX2 and the scalar ones (older x86,
    # other architectures) are built too, each in its own process and cache, and checked alike
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = []
    for flags, isa in (("-march=native -mno-avx512f", f"[{native.has_avx2()}, False]"),
                       ("-march=native -mno-avx", "[False, False]")):
        env = dict(os.environ, LLCUDA_CACHE=str(tmp_path / flags.split()[-1] / "models"),
                   PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))  # fmt: skip
        command = [sys.executable, "-c", _VARIANT_CHECK, flags, isa]
        runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for run in runs:
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output[-3000:]


def test_builds_are_keyed_by_the_cpu(monkeypatch):
    # -march=native: a build made on another kind of CPU is never loaded here
    here = qn.build_dir()
    monkeypatch.setattr(qn, "_cpu_features", lambda: "fpu sse2 avx2 avx512f")
    assert qn.build_dir() != here and qn.build_dir().parent == here.parent
