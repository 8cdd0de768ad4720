#!/usr/bin/env bash
# One device call, gemma3 1B twin: batched decode (llcuda vs llama-batched-bench) and HTTP
# serving load (llcuda serve vs llama-server -np 64) with ../shared/peer/http_load.py.
# Needs carried: .peer/llamacpp-sm90.tar.xz, .peer/http_load.py and .whl/ (gguf, fastapi,
# starlette, pydantic, pydantic_core, annotated_types, typing_inspection, uvicorn, opentelemetry_api).
# Usage (on the device, repo root): bash benchmarks/serving_vs_llamacpp.sh [OUT_DIR] [PARTS]
#   PARTS: any of "batched serve json" (default "batched serve"); json (issue 19) runs 64
#   streaming clients with one JSON schema (llama-server's `json_schema` field, which llcuda
#   serve takes too) beside 64 free ones on each server; it needs .whl/llguidance-*.whl.
set -uo pipefail
out=${1:-${OUT:-/tmp/bench-out}}
parts=${2:-batched serve}
mkdir -p "$out" ${MODEL_DIR:-/tmp/models} /tmp/peer
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site:${PYTHONPATH:-}
[ -x /tmp/peer/llama-server ] || [ ! -f .peer/llamacpp-sm90.tar.xz ] || tar xJf .peer/llamacpp-sm90.tar.xz -C /tmp/peer
peer=$([ -x /tmp/peer/llama-server ] && echo yes || echo "")  # llcuda alone without the archive
export LD_LIBRARY_PATH=/tmp/peer:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "commit ${LLCUDA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee "$out/commit.txt"
m=${MODEL_DIR:-/tmp/models}/gemma3-1b-twin.gguf
[ -f "$m" ] || python3 -m llcuda.gguf.synthetic "$m" --preset 1b

wait_up() {  # url, pid
  for _ in $(seq 600); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('$1/health', timeout=2)" \
      2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

load() {  # url label clients requests [extra request fields, JSON]
  python3 .peer/http_load.py "$1" --label "$2" --clients "$3" --requests "$4" \
    --prompt-words 100 --max-tokens 128 --extra "${5:-"{}"}" 2>&1 | tee -a "$out/serving.txt"
}

# An object of 100 integers: no output can end before max_tokens (128), so both kinds of client
# generate the same number of tokens
schema='{"type":"object","properties":{"values":{"type":"array","items":{"type":"integer",
"minimum":0,"maximum":999},"minItems":100,"maxItems":100}},"required":["values"]}'
json_extra="{\"json_schema\":${schema//$'\n'/}}"

if [[ $parts == *batched* ]]; then
  echo "== llcuda batched decode"
  python3 benchmarks/batched_bench.py "$m" -npp 128 -ntg 128 -npl 1,4,8,16,32,64,128 \
    2>&1 | tee "$out/llcuda_batched.txt"
  [ -n "$peer" ] && echo "== llama-batched-bench" &&
  /tmp/peer/llama-batched-bench -m "$m" -ngl 99 -fa on -c 40000 -b 2048 -ub 512 \
    -npp 128 -ntg 128 -npl 1,4,8,16,32,64,128 2>&1 | grep -E "^\|" | tee "$out/llamacpp_batched.txt"
fi

if [[ $parts == *serve* || $parts == *json* ]]; then
  echo "== llcuda serve"
  python3 -m llcuda.cli serve "$m" --port 8090 -np 256 -c 512 -b 2048 -ub 512 -q \
    > "$out/llcuda_server.log" 2>&1 &
  pid=$!
  if wait_up http://127.0.0.1:8090 $pid; then
    load http://127.0.0.1:8090 "llcuda warmup" 8 1 > /dev/null
    if [[ $parts == *serve* ]]; then
      load http://127.0.0.1:8090 "llcuda" 1 2
      load http://127.0.0.1:8090 "llcuda" 64 2
      load http://127.0.0.1:8090 "llcuda" 256 2
    fi
    if [[ $parts == *json* ]]; then
      load http://127.0.0.1:8090 "llcuda json warmup" 8 1 "$json_extra" > /dev/null
      load http://127.0.0.1:8090 "llcuda free" 64 2
      load http://127.0.0.1:8090 "llcuda json_schema" 64 2 "$json_extra"
    fi
  else
    echo "llcuda serve did not come up"; tail -30 "$out/llcuda_server.log"
  fi
  kill -TERM $pid; wait $pid
  [ -z "$peer" ] && exit 0
  echo "== llama-server -np 64"
  /tmp/peer/llama-server -m "$m" -ngl 99 -fa on -c 65536 -np 64 --host 127.0.0.1 --port 8091 \
    > "$out/llamacpp_server.log" 2>&1 &
  pid=$!
  if wait_up http://127.0.0.1:8091 $pid; then
    load http://127.0.0.1:8091 "llama.cpp warmup" 8 1 > /dev/null
    load http://127.0.0.1:8091 "llama.cpp" 64 2
    [[ $parts == *json* ]] && load http://127.0.0.1:8091 "llama.cpp json_schema" 64 2 "$json_extra"
    [ -n "${WITH_PEER_256:-}" ] && load http://127.0.0.1:8091 "llama.cpp" 256 2
  else
    echo "llama-server did not come up"; tail -30 "$out/llamacpp_server.log"
  fi
  kill -TERM $pid; wait $pid
fi
