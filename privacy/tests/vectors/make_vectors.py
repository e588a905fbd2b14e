"""Test vectors for covey-privacy's RDP accountant, from Google's dp_accounting.

Reproduce (writes rdp_vectors.json beside this script):
    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpenv/bin/python privacy/tests/vectors/make_vectors.py
"""
import json
import math
import os

import dp_accounting

QS = [0.001, 0.01, 0.1, 0.5, 1.0]
SIGMAS = [0.5, 1.0, 2.0, 5.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-6]

vectors = []
for q in QS:
    for sigma in SIGMAS:
        for steps in STEPS:
            acc = dp_accounting.rdp.RdpAccountant()
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, steps)
            for delta in DELTAS:
                eps, order = acc.get_epsilon_and_optimal_order(delta)
                vectors.append({
                    "q": q, "sigma": sigma, "steps": steps, "delta": delta,
                    "epsilon": eps if math.isfinite(eps) else "inf",
                    "order": float(order),
                })

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rdp_vectors.json")
with open(out, "w") as f:
    json.dump({"generator": f"dp_accounting {getattr(dp_accounting, '__version__', '0.6.0')} RdpAccountant, default orders",
               "vectors": vectors}, f, indent=1)
print(f"wrote {len(vectors)} vectors to {out}")
