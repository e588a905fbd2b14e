"""Test vectors for covey-privacy's one-run privacy audit (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023), from the paper's p-value
(Theorem 3.3 with its delta term) written with scipy's binomial distribution.

Reproduce (writes audit_vectors.json beside this script):
    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0  # brings scipy
    /tmp/dpenv/bin/python privacy/tests/vectors/make_audit_vectors.py
"""
import json
import math
import os

from scipy import stats


def p_value(m, r, v, eps, delta):
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def lower_bound(m, r, v, delta, confidence):
    p = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        hi *= 2
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


cases = [(100, 20, 20), (100, 20, 15), (200, 50, 50), (200, 50, 45), (200, 100, 80),
         (1000, 200, 150), (128, 32, 30), (64, 10, 10)]
p_values = []
for m, r, v in cases:
    for eps in [0.0, 0.5, 1.0, 2.0, 4.0]:
        for delta in [0.0, 1e-5]:
            p_values.append({"m": m, "r": r, "v": v, "epsilon": eps, "delta": delta,
                             "p_value": p_value(m, r, v, eps, delta)})
bounds = []
for m, r, v in cases:
    for delta in [0.0, 1e-5]:
        bounds.append({"m": m, "r": r, "v": v, "delta": delta, "confidence": 0.95,
                       "lower_bound": lower_bound(m, r, v, delta, 0.95)})

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "audit_vectors.json")
with open(out, "w") as f:
    json.dump({"generator": "the p-value of Steinke, Nasr and Jagielski 2023 (Thm 3.3) with scipy.stats.binom",
               "p_values": p_values, "bounds": bounds}, f, indent=1)
print(f"wrote {len(p_values)} p-values and {len(bounds)} bounds to {out}")
