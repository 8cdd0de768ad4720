#!/usr/bin/env bash
# Run the `llcuda` command from the project's .venv (set up on first use), e.g.
#   ./scripts/run.sh generate "Explain KV caches"
#   ./scripts/run.sh info gemma-3-270m-Q4_K_M
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" >&2
exec "$root/.venv/bin/llcuda" "$@"
