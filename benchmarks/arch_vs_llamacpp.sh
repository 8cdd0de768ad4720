#!/usr/bin/env bash
# One device call: twins of Llama-3.2-1B/3B, Llama-3.1-8B and Qwen2.5-7B (random weights in the
# tensor-type mix of their Q4_K_M files, real vocab sizes), llcuda beside llama.cpp: pp512, tg128.
# Needs: .peer/llamacpp-sm90.tar.xz (from ../shared/peer) and .whl/gguf-*.whl, both carried.
# Usage (on the device, repo root): bash benchmarks/arch_vs_llamacpp.sh [OUT_DIR] [PRESET[:MIX]...]
#   PRESET: a bench twin (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-7b) or 4b / 1b (Gemma 3
#   4B / 1B); MIX: the llama-quantize file type of its tensor-type mix (Q4_K_M by default; also
#   Q3_K_M, Q2_K, IQ4_XS, IQ2_XS, Q8_0), e.g. llama-3.1-8b:IQ4_XS.
# VARIANTS: llcuda runs per twin, each a comma-separated list of environment assignments
#   ("-" for none), e.g. VARIANTS="- LLCUDA_GEMV_XPRE=1 LLCUDA_PDL=0"; INT8_VARIANTS="0 auto 1"
#   (the older form) runs one per LLCUDA_GEMV_INT8 value. REPS (default 3) is both tools'
#   repetitions. END (seconds, optional): skip what would start later than END - 60 s after the
#   start, so that a call's limit never cuts a run in half.
set -uo pipefail
t0=$(date +%s)
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

if [ -n "${VARIANTS:-}" ]; then
  variants=($VARIANTS)
else
  variants=()
  for int8 in ${INT8_VARIANTS:-${LLCUDA_GEMV_INT8:-auto}}; do variants+=("LLCUDA_GEMV_INT8=$int8"); done
fi
time_left() {  # true while a run started now would end before END
  [ -z "${END:-}" ] || [ $(( END - ($(date +%s) - t0) )) -gt 60 ]
}

for entry in "${presets[@]}"; do
  preset=${entry%%:*}; mix=Q4_K_M
  [ "$entry" = "$preset" ] || mix=${entry#*:}
  m=/tmp/models/$preset-$mix-twin.gguf
  [ -f "$m" ] || python3 -m llcuda.gguf.synthetic "$m" --preset "$preset" --mix "$mix" \
    > "$out/gen-$preset-$mix.txt" 2>&1 || { tail -5 "$out/gen-$preset-$mix.txt"; continue; }
  for variant in "${variants[@]}"; do
    time_left || { echo "skipped llcuda $preset $mix $variant: END"; continue; }
    env_args=()
    [ "$variant" = "-" ] || IFS=, read -r -a env_args <<< "$variant"
    echo "== llcuda $preset $mix ${variant/#-/default}" | tee -a "$out/llcuda.txt"
    env "${env_args[@]}" python3 benchmarks/bench_llcuda.py "$m" -p 512 -n 128 -r "${REPS:-3}" \
      2>&1 | tee -a "$out/llcuda.txt"
  done
  time_left || { echo "skipped llama.cpp $preset $mix: END"; continue; }
  echo "== llama.cpp $preset $mix" | tee -a "$out/llamacpp.txt"
  /tmp/peer/llama-bench -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r "${REPS:-3}" -o md 2>&1 \
    | tee -a "$out/llamacpp.txt"
done
echo "done at $(( $(date +%s) - t0 )) s"
