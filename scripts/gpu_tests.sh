#!/usr/bin/env bash
# The GPU tests (tests/kernels, and the engine ones there) on the device machine, in parallel
# pytest processes that share the GPU, each with a time limit, so that one slow file cannot take
# the whole call and every failure is reported with its one-line message (--tb=line).
# Needs .whl/ carried (gguf, pytest and their dependencies) where they are not installed.
# Usage (device, repo root): OUT=DIR [LIMIT=400] [SPLIT=4] bash scripts/gpu_tests.sh [FILE...]
#   FILE: test files (default: every tests/kernels/test_*.py); the two largest files run in
#   SPLIT processes each. Writes DIR/t_NAME.txt per process and prints each one's summary.
set -uo pipefail
out=${OUT:-/tmp/gpu-tests}; limit=${LIMIT:-400}; split=${SPLIT:-4}
mkdir -p "$out"
if ! python3 -c "import gguf, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-}
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/kernels/test_*.py)
t0=$(date +%s)

run_part() {  # name, pytest arguments...
  local name=$1; shift
  timeout "$limit" python3 -m pytest -q --tb=line -p no:cacheprovider "$@" > "$out/t_$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc $rc$([ $rc -eq 124 ] && echo ' (time limit)') at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)|^/.*(Error|assert)|^E |[0-9]+ (passed|failed|skipped)|no tests ran" "$out/t_$name.txt" \
    | cut -c1-400 | tail -15
}

for f in "${files[@]}"; do
  name=$(basename "$f" .py); name=${name#test_}
  case $name in
    quant_matmul|quant_lowbit)  # the two largest: their cases in $split processes
      mapfile -t ids < <(python3 -m pytest -q --collect-only -p no:cacheprovider "$f" 2>/dev/null \
                         | grep '::')
      per=$(( (${#ids[@]} + split - 1) / split ))
      for i in $(seq 0 $(( split - 1 ))); do
        part=("${ids[@]:$(( i * per )):$per}")
        [ ${#part[@]} -gt 0 ] && run_part "$name$i" "${part[@]}" &
      done ;;
    *) run_part "$name" "$f" & ;;
  esac
done
wait
echo "all done at $(( $(date +%s) - t0 )) s"
