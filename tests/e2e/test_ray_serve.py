"""examples/ray_serve_app.py on a local Ray instance: two llcuda replicas behind Ray Serve's HTTP
proxy answer completions, /v1/models and /metrics. Needs `ray[serve]`, which llcuda does not
depend on: skipped where it is not installed (CI); about 30 s on 2 cores where it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_serve_app.py"


@pytest.mark.slow
def test_two_replicas_behind_ray_serve():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tiny", "--replicas", "2", "--device", "cpu", "-c",
         "128", "--port", "8765", "--check"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("completion: b'") == 2, out
    assert "models: tiny.gguf" in out
    assert 'vllm:num_requests_running{model_name="tiny.gguf"}' in out
