"""Write the PTX of the quantized-weight kernels (GEMV, tensor-core GEMM, swapped GEMM,
dequantizer) for sm_90 and sm_75, without a GPU, with debug labels stripped and registers
renamed, so that two checkouts can be diffed: a refactor that leaves every file equal cannot
change the GPU code.

    python scripts/kernel_ptx.py OUT_DIR      # in each tree, then: diff -r OUT_A OUT_B

Needs triton (it compiles for the named targets with the ptxas it ships).
"""

from __future__ import annotations

import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(_ROOT, "src"), _ROOT]  # this checkout's llcuda, not an installed one

from llcuda.gguf.constants import GGMLType  # noqa: E402
from llcuda.kernels import quant_dequant as qd  # noqa: E402
from llcuda.kernels import quant_matmul as qm  # noqa: E402
from llcuda.kernels import quant_tc as tc  # noqa: E402
from tests.kernels.test_compile_targets import _packed, _weight_args, compile_ptx  # noqa: E402

SHAPES = [(GGMLType.Q5_0, 1152, 1536), (GGMLType.Q4_K, 6912, 1152), (GGMLType.Q6_K, 6912, 1152),
          (GGMLType.Q8_0, 1152, 4096), (GGMLType.F16, 640, 1024)]


def normalized(ptx: str) -> str:
    """Without debug lines and labels, registers renamed by class (%r12 -> %r)."""
    lines = [ln for ln in ptx.splitlines()
             if not ln.strip().startswith((".loc", ".file", "//"))
             and not re.match(r"\$L__tmp\d+:", ln)]
    text = re.sub(r"\.section\s+\.debug.*", "", "\n".join(lines), flags=re.S)
    text = re.sub(r"\$L__tmp\d+", "$L__tmp", text)
    return re.sub(r"%(r|rd|p|f|fd|rs|h|hh)\d+", r"%\1", text)


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for qtype, k, n in SHAPES:
        w = _packed(qtype, k, n)
        wpg = qm._WPG[int(qtype)]
        ints = {"M": 3, "N": n, "n_groups": k // 32, "groups_per_split": 8, "stride_xm": k,
                "stride_osplit": 3}  # fmt: skip
        for cap in (90, 75):
            target = GPUTarget("cuda", cap, 32)
            for m in (1, 4):  # the decode GEMV
                cfg = qm.gemv_config(int(qtype), m, n, k // 32, 132)
                args = {"x_ptr": torch.empty(1), "xq_ptr": torch.empty(1, dtype=torch.int32),
                        "xm_ptr": torch.empty(1), "out_ptr": torch.empty(1), **_weight_args(w),
                        **ints}  # fmt: skip
                ptx = compile_ptx(qm._quant_gemv_kernel, args, {
                    "GATED_OUT": 0, "QTYPE": int(qtype), "WPG": wpg,
                    "HAS_MIN": int(qtype) in qm._HAS_MIN,
                    "BLOCK_M": m, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_G": cfg["BLOCK_G"],
                    "NUM_STAGES": cfg["num_stages"], "PRELOAD": cfg["PRELOAD"], "USE_ASM": True,
                    "INT8_X": False, "XPRE": False, "PDL": False,
                }, target, cfg["num_warps"], cfg["num_stages"])  # fmt: skip
                _write(out, f"gemv_{qtype.name}_sm{cap}_m{m}", ptx)
            for fp16 in (False, True) if cap == 90 else (True,):
                x = torch.empty(1, dtype=torch.float16 if fp16 else torch.bfloat16)
                args = {"x_ptr": x, "out_ptr": torch.empty(1), "xscale_ptr": torch.empty(1),
                        **_weight_args(w), **ints}  # fmt: skip
                ptx = compile_ptx(qm._quant_gemm_kernel, args, {
                    "QTYPE": int(qtype), "WPG": wpg, "BLOCK_M": 64, "BLOCK_N": 128,
                    "BLOCK_G": 32 // wpg, "GROUP_M": 8, "USE_FP16": fp16, "USE_ASM": True,
                }, target, 4, 2)  # fmt: skip
                _write(out, f"gemm_{qtype.name}_sm{cap}_{'fp16' if fp16 else 'bf16'}", ptx)
            if cap == 90:
                args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "out_ptr": torch.empty(1),
                        **_weight_args(w), **ints}  # fmt: skip
                ptx = compile_ptx(tc._quant_gemm_swap_kernel, args, {
                    "QTYPE": int(qtype), "WPG": wpg, "BLOCK_M": 64, "BLOCK_N": 128,
                    "BLOCK_G": 32 // wpg, "USE_ASM": True,
                }, target, 8, 1)  # fmt: skip
                _write(out, f"swap_{qtype.name}_sm{cap}", ptx)
            for gather, plane_major, dtype in ((False, True, torch.bfloat16),
                                               (True, False, torch.float32)):
                args = {"out_ptr": torch.empty(1, dtype=dtype),
                        "ids_ptr": torch.empty(1, dtype=torch.int64), **_weight_args(w), "R": 5,
                        "N": n, "n_groups": k // 32, "stride_out": k, "scale": 2.0}  # fmt: skip
                ptx = compile_ptx(qd._dequant_rows_kernel, args, {
                    "QTYPE": int(qtype), "WPG": wpg, "BLOCK_R": 16, "BLOCK_G": 128 // wpg,
                    "GATHER": gather, "PLANE_MAJOR": plane_major, "USE_ASM": True,
                }, target, 4, 1)  # fmt: skip
                _write(out, f"dequant_{qtype.name}_sm{cap}_{'gather' if gather else 'all'}", ptx)
    print(f"{len(os.listdir(out))} files in {out} from {os.path.dirname(qm.__file__)} "
          f"(triton {triton.__version__})")


def _write(out: str, name: str, ptx: str) -> None:
    with open(os.path.join(out, name + ".ptx"), "w") as f:
        f.write(normalized(ptx))


if __name__ == "__main__":
    main()
