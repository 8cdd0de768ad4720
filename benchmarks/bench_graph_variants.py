"""pp512 / tg128 of one model with the prefill CUDA graphs on, off, or set up differently, the
variants alternating in rounds so a drifting GPU or host shows up as spread, not as a difference.

    python benchmarks/bench_graph_variants.py MODEL [--variants on,off,late,nogc] [--rounds 2]

on: as shipped. off: no prefill graphs. late: prefill graphs captured after the decode graphs, in
their own pool. nogc: as shipped, Python's garbage collector off. Each run loads the model afresh
in a child process (`llcuda.bench.run_bench`, -p 512 -n 128 -r 3). To compare with another
checkout, run this script with that checkout's src first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import gc, json, sys
import llcuda.runner.cuda_graphs as g
import llcuda.runner.model_runner as mr
from llcuda.bench import run_bench
variant, model = sys.argv[1], sys.argv[2]
capture = g.PrefillGraphs.capture
if variant == "off":
    g.PrefillGraphs.capture = lambda self, pool=None: None
    g.PrefillGraphs.bucket_for = lambda self, n: None
elif variant == "late":
    g.PrefillGraphs.capture = lambda self, pool=None: None
    init = mr.ModelRunner.__init__
    def late_init(self, *a, **k):
        init(self, *a, **k)
        if self.prefill_graphs is not None:
            capture(self.prefill_graphs)
    mr.ModelRunner.__init__ = late_init
elif variant == "nogc":
    gc.disable()
r = run_bench(model, 512, 128, 3)
print(json.dumps({"variant": variant, "pp": r.pp_tok_s, "tg": r.tg_tok_s}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default="on,off,late,nogc")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, variant, args.model],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{row['variant']:5s} pp512 {row['pp']:10,.0f}  tg128 {row['tg']:7,.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
