"""Test vectors for covey-privacy's DP-FTRL (tree aggregation, restart) accounting, from
Google's dp_accounting.

A device contributes to at most `participations` trees (one step in each: the
coordinator's min-separation equals the tree's period), every tree `period` steps:
    RdpAccountant: SelfComposedDpEvent(SingleEpochTreeAggregationDpEvent(z, period), k)
and, independently, the PLD of the equivalent Gaussian mechanism (sensitivity
sqrt(k * depth), depth = ceil(log2(period + 1))):
    PLDAccountant: GaussianDpEvent(z / sqrt(k * depth))

dp_accounting accounts tree aggregation under REPLACE_SPECIAL adjacency (a device's
contribution replaced by zero), which for these sums has the same Gaussian sensitivity
as adding or removing the device (Covey divides by the fixed expected cohort).

Reproduce (writes tree_vectors.json beside this script):
    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpenv/bin/python privacy/tests/vectors/make_tree_vectors.py
"""
import json
import math
import os

import dp_accounting

ZS = [0.5, 1.0, 2.0, 5.0, 10.0]
PERIODS = [1, 2, 7, 16, 100, 1000]
PARTICIPATIONS = [1, 2, 5, 20]
DELTAS = [1e-5, 1e-6]

vectors = []
for z in ZS:
    for period in PERIODS:
        for k in PARTICIPATIONS:
            tree = dp_accounting.SelfComposedDpEvent(
                dp_accounting.SingleEpochTreeAggregationDpEvent(z, period), k)
            rdp = dp_accounting.rdp.RdpAccountant(
                neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
            rdp.compose(tree)
            depth = math.ceil(math.log2(period + 1))
            pld = dp_accounting.pld.PLDAccountant()
            pld.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(k * depth)))
            for delta in DELTAS:
                vectors.append({
                    "noise_multiplier": z, "period": period, "participations": k, "delta": delta,
                    "rdp_epsilon": rdp.get_epsilon(delta), "pld_epsilon": pld.get_epsilon(delta),
                })

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tree_vectors.json")
with open(out, "w") as f:
    json.dump({"generator": "dp_accounting 0.6.0: RdpAccountant on SingleEpochTreeAggregationDpEvent "
               "(self-composed per participation); PLDAccountant on the equivalent GaussianDpEvent",
               "vectors": vectors}, f, indent=1)
print(f"wrote {len(vectors)} vectors to {out}")
