#!/usr/bin/env bash
# One device call: synthetic Gemma 3 270M and 1B twins (exact Q4_K_M mix), llcuda beside llama.cpp.
# Needs: .peer/llamacpp-sm90.tar.xz (from ../shared/peer) and .whl/gguf-*.whl, both carried.
# Usage (on the device, repo root): bash benchmarks/vs_llamacpp.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-/tmp/bench-out}}
mkdir -p "$out" /tmp/models /tmp/peer
if ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
tar xJf .peer/llamacpp-sm90.tar.xz -C /tmp/peer
export LD_LIBRARY_PATH=/tmp/peer:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "commit ${LLCUDA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee "$out/commit.txt"
for preset in 270m 1b; do
  m=/tmp/models/gemma3-$preset-twin.gguf
  [ -f "$m" ] || python3 -m llcuda.gguf.synthetic "$m" --preset "$preset"
  echo "== llcuda $preset"
  python3 benchmarks/bench_llcuda.py "$m" -p 512 -n 128 -r 3 2>&1 | tee -a "$out/llcuda.txt"
  echo "== llama.cpp $preset"
  /tmp/peer/llama-bench -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o md 2>&1 | tee -a "$out/llamacpp.txt"
done
m=/tmp/models/gemma3-1b-twin.gguf
echo "== llcuda 1b depth 4096"
python3 benchmarks/bench_llcuda.py "$m" -p 512 -n 128 -r 2 -d 4096 2>&1 | tee -a "$out/llcuda.txt"
echo "== llama.cpp 1b depth 4096"
/tmp/peer/llama-bench -m "$m" -ngl 99 -fa 1 -p 0 -n 128 -d 4096 -r 2 -o md 2>&1 | tee -a "$out/llamacpp.txt"
