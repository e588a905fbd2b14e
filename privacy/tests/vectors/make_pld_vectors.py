"""Test vectors for covey-privacy's PLD accountant, from Google's dp_accounting.

PLDAccountant (add/remove adjacency, connect-the-dots discretization at the
accountant's default value interval 1e-4) on PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)) composed `steps` times, read at each delta.

Reproduce (writes pld_vectors.json beside this script; a few minutes):
    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpenv/bin/python privacy/tests/vectors/make_pld_vectors.py
"""
import json
import math
import os
import sys
import time

import dp_accounting

QS = [0.001, 0.01, 0.1, 0.5, 1.0]
SIGMAS = [0.5, 1.0, 2.0, 5.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-6]

vectors = []
for q in QS:
    for sigma in SIGMAS:
        for steps in STEPS:
            start = time.time()
            acc = dp_accounting.pld.PLDAccountant()
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, steps)
            for delta in DELTAS:
                eps = acc.get_epsilon(delta)
                vectors.append({
                    "q": q, "sigma": sigma, "steps": steps, "delta": delta,
                    "epsilon": eps if math.isfinite(eps) else "inf",
                })
            print(f"q={q} sigma={sigma} steps={steps}: {vectors[-2]['epsilon']} "
                  f"({time.time() - start:.1f} s)", file=sys.stderr, flush=True)

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pld_vectors.json")
with open(out, "w") as f:
    json.dump({"generator": "dp_accounting 0.6.0 PLDAccountant (add/remove, value interval 1e-4)",
               "vectors": vectors}, f, indent=1)
print(f"wrote {len(vectors)} vectors to {out}")
