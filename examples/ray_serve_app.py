"""llcuda replicas behind Ray Serve's HTTP proxy: one machine, or every node of a Ray cluster.

Each Ray Serve replica is a process that loads the model once (one GPU each with --gpus 1) and
answers with llcuda's own OpenAI-compatible app (llcuda.server.app.create_app, the routes of
`llcuda serve`). Ray's proxy, on every node, spreads requests over the replicas (power of two
choices on their queue lengths); placing replicas on nodes, restarting failed ones and
autoscaling are Ray's. llcuda needs nothing of its own for many machines.

    pip install "ray[serve]"
    ray start --head                        # the other nodes: ray start --address HEAD:6379
    python examples/ray_serve_app.py MODEL.gguf --replicas 4 --gpus 1   # MODEL on every node
    curl http://HEAD:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Hello", "max_tokens": 16}'

Or as a Ray Serve application (a config file for `serve deploy`, or KubeRay's RayService):

    serve run examples.ray_serve_app:build_app model=MODEL.gguf replicas=4 gpus=1

Without a running cluster the script starts a local Ray instance. On the CPU with a tiny random
model, two replicas, one request each, then exit (`--check`):

    python examples/ray_serve_app.py --tiny --replicas 2 --check
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from ray import serve


@serve.deployment
@serve.ingress()
class LlcudaServer:
    """One replica: an InferenceEngine and the `llcuda serve` app over it."""

    def __init__(self, model: str, load_kwargs: dict, model_name: str | None = None):
        from llcuda.api import InferenceEngine

        self.engine = InferenceEngine()
        self.engine.load_model(model, verbose=False, **load_kwargs)
        self.model_name = model_name or os.path.basename(model)

    def __serve_build_asgi_app__(self):
        from llcuda.server.app import create_app

        return create_app(self.engine, model_name=self.model_name)

    def __del__(self):
        self.engine.unload_model()


def build_app(args: dict):
    """`serve run examples.ray_serve_app:build_app model=... replicas=N gpus=G ctx_size=C
    n_parallel=P device=cpu|cuda`: the application Ray Serve deploys."""
    replicas, gpus = int(args.get("replicas", 1)), float(args.get("gpus", 0))
    load_kwargs = {"ctx_size": int(args.get("ctx_size", 2048))}
    if "n_parallel" in args:
        load_kwargs["n_parallel"] = int(args["n_parallel"])
    if "device" in args:
        load_kwargs["device"] = args["device"]
    # each replica takes requests up to what its engine batches, and queues the rest in Ray
    ongoing = 4 * load_kwargs.get("n_parallel", 4)
    deployment = LlcudaServer.options(num_replicas=replicas, max_ongoing_requests=ongoing,
                                      ray_actor_options={"num_gpus": gpus})  # fmt: skip
    return deployment.bind(args["model"], load_kwargs, args.get("model_name"))


def _check(port: int, replicas: int) -> None:
    """One completion per replica through Ray's proxy; /v1/models and /metrics answer."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(replicas):
            body = {"prompt": f"hello {i}", "max_tokens": 4, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            print("completion:", r.json()["choices"][0]["text"][:40].encode())
        print("models:", client.get("/v1/models").json()["data"][0]["id"])
        gauges = [line for line in client.get("/metrics").text.splitlines()
                  if line.startswith("vllm:")]  # fmt: skip
        print("metrics:", *gauges, sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a .gguf path present on every node")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 (a test)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per replica")
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("-np", "--n-parallel", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--check", action="store_true",
                        help="send a request per replica, print the answers and exit")  # fmt: skip
    args = parser.parse_args()
    model = args.model
    if args.tiny:
        from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

        model = str(write_gemma3_gguf(os.path.join(tempfile.mkdtemp(), "tiny.gguf"), **TINY))
    if model is None:
        parser.error("give MODEL or --tiny")
    app_args = {"model": model, "replicas": args.replicas, "gpus": args.gpus,
                "ctx_size": args.ctx_size}  # fmt: skip
    if args.n_parallel is not None:
        app_args["n_parallel"] = args.n_parallel
    if args.device is not None:
        app_args["device"] = args.device
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name="llcuda", route_prefix="/")
    print(f"llcuda on Ray Serve: http://{args.host}:{args.port}/v1 ({args.replicas} replicas)")
    if args.check:
        _check(args.port, args.replicas)
        serve.shutdown()
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
