#!/usr/bin/env bash
# One device call: twins of Llama-3.2-1B/3B, Llama-3.1-8B and Qwen2.5-7B (random weights in the
# tensor-type mix of their Q4_K_M files, real vocab sizes), llcuda beside llama.cpp: pp512, tg128.
# Needs: .peer/llamacpp-sm90.tar.xz (from ../shared/peer) and .whl/gguf-*.whl, both carried.
# Usage (on the device, repo root): bash benchmarks/arch_vs_llamacpp.sh [OUT_DIR] [PRESET...]
# INT8_VARIANTS="0 auto 1" runs llcuda once per LLCUDA_GEMV_INT8 value (fp32 / by size / int8
# decode GEMV activations; default auto); REPS (default 3) is both tools' repetitions; presets
# include 4b and 1b (Gemma 3 4B / 1B).
set -uo pipefail
out=${1:-${OUT:-/tmp/bench-out}}
shift || true
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(llama-3.2-1b llama-3.2-3b llama-3.1-8b qwen2.5-7b)
mkdir -p "$out" /tmp/models /tmp/peer
if ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
[ -x /tmp/peer/llama-bench ] || tar xJf .peer/llamacpp-sm90.tar.xz -C /tmp/peer
export LD_LIBRARY_PATH=/tmp/peer:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "commit ${LLCUDA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee "$out/commit.txt"
for preset in "${presets[@]}"; do
  m=/tmp/models/$preset-twin.gguf
  [ -f "$m" ] || python3 -m llcuda.gguf.synthetic "$m" --preset "$preset"
  for int8 in ${INT8_VARIANTS:-${LLCUDA_GEMV_INT8:-auto}}; do
    echo "== llcuda $preset LLCUDA_GEMV_INT8=$int8" | tee -a "$out/llcuda.txt"
    LLCUDA_GEMV_INT8=$int8 python3 benchmarks/bench_llcuda.py "$m" -p 512 -n 128 -r "${REPS:-3}" \
      2>&1 | tee -a "$out/llcuda.txt"
  done
  echo "== llama.cpp $preset" | tee -a "$out/llamacpp.txt"
  /tmp/peer/llama-bench -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r "${REPS:-3}" -o md 2>&1 \
    | tee -a "$out/llamacpp.txt"
done
