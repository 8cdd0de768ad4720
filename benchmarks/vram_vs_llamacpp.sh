#!/usr/bin/env bash
# VRAM of llama-server and llcuda serve on the same GGUF at the same ctx_size, one sequence, each
# server alone on the GPU: nvidia-smi once it answers /health and again after one request.
# Needs .peer/llamacpp-sm90.tar.xz carried (and the server wheels on PYTHONPATH).
# Usage (on the device, repo root): bash benchmarks/vram_vs_llamacpp.sh MODEL.gguf [CTX ...]
set -uo pipefail
m=$1; shift
ctxs=${*:-4096 32768}
mkdir -p /tmp/peer
[ -x /tmp/peer/llama-server ] || tar xJf .peer/llamacpp-sm90.tar.xz -C /tmp/peer
export LD_LIBRARY_PATH=/tmp/peer:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/src:${PYTHONPATH:-}
up() { for _ in $(seq 240); do
  python3 -c "import urllib.request; urllib.request.urlopen('$1/health', timeout=2)" 2>/dev/null \
    && return 0; sleep 0.5; done; return 1; }
req() { python3 -c "
import json, urllib.request
body = json.dumps({'prompt': 'hello ' * 900, 'max_tokens': 64, 'temperature': 0}).encode()
urllib.request.urlopen(urllib.request.Request('$1/v1/completions', body,
                       {'Content-Type': 'application/json'}), timeout=120).read()"; }
smi() { nvidia-smi --query-compute-apps=used_memory --format=csv,noheader | tr '\n' ' '; }
for c in $ctxs; do
  /tmp/peer/llama-server -m "$m" -ngl 99 -fa on -c "$c" -np 1 --port 8081 > /tmp/ls.log 2>&1 &
  pid=$!
  up http://127.0.0.1:8081 && echo "llama-server -c $c: up $(smi)after a request $(req http://127.0.0.1:8081; smi)"
  kill $pid; wait $pid 2>/dev/null
  python3 -m llcuda.cli serve "$m" --port 8090 -np 1 -c "$c" > /tmp/lc.log 2>&1 & pid=$!
  up http://127.0.0.1:8090 && echo "llcuda serve -c $c: up $(smi)after a request $(req http://127.0.0.1:8090; smi)"
  kill $pid; wait $pid 2>/dev/null
done
