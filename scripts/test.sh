#!/usr/bin/env bash
# Run the test suite in the project's .venv (set up on first use). Extra arguments go to
# pytest. Without a GPU the tests marked `gpu` are skipped. Exits non-zero on any failure,
# and also when pytest collected no test at all (its exit code 5).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" || { echo "test.sh: setup failed" >&2; exit 1; }
cd "$root"
"$root/.venv/bin/python" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; counting that as a failure" >&2
    exit 1
fi
exit "$rc"
