"""MMLU reports side by side: accuracy with its 95% interval, and for each pair of models the
questions one gets right and the other wrong (a paired comparison: McNemar's exact test).

    python3 bench/moe/mmlu_pairs.py A.json B.json [C.json ...]
"""
import json
import math
import sys
from itertools import combinations


def load(path):
    r = json.load(open(path))
    r = r.get("report", r)  # `recompose eval mmlu --json` wraps the report with its KV policy
    r["right"] = [p == a for p, a in zip(r["picks"], r["answers"])]
    return r


def mcnemar(b, c):
    """Two-sided exact p-value of b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


reports = [(p.split("/")[-1].removesuffix(".json"), load(p)) for p in sys.argv[1:]]
print("| model | accuracy | 95% interval | questions |")
print("|---|---:|---:|---:|")
for name, r in reports:
    print(f"| {name} | {100 * r['accuracy']:.1f}% | ±{100 * r['ci95']:.1f} | {r['total']} |")
if len({len(r["right"]) for _, r in reports}) == 1:
    print()
    print("| pair | A right, B wrong | B right, A wrong | McNemar p |")
    print("|---|---:|---:|---:|")
    for (na, a), (nb, b) in combinations(reports, 2):
        x = sum(1 for p, q in zip(a["right"], b["right"]) if p and not q)
        y = sum(1 for p, q in zip(a["right"], b["right"]) if q and not p)
        print(f"| {na} vs {nb} | {x} | {y} | {mcnemar(x, y):.3f} |")
