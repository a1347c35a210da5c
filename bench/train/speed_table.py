#!/usr/bin/env python3
"""The training-speed table of docs/BENCHMARKS.md from bench/results/train/speed.jsonl: per mode,
threads and variant, the median over rounds of tokens/s and peak RSS, and recompose's ratios to
transformers at the same memory policy (keep activations / recompute them)."""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "bench/results/train/speed.jsonl") if l.strip()]
g = defaultdict(list)
for r in rows:
    keep = not r.get("recompute", r.get("checkpointing", False))
    g[(r["mode"], r["threads"], r["peer"].split("+")[0], keep)].append(r)
print("| mode | threads | activations | recompose tok/s | transformers tok/s | ratio | recompose peak RSS MiB | transformers peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for mode in ["lora", "full"]:
    for th in [1, 2]:
        for keep in [True, False]:
            a, b = g.get((mode, th, "recompose", keep)), g.get((mode, th, "transformers", keep))
            if not a or not b:
                continue
            ta, tb = statistics.median(x["tokens_per_s"] for x in a), statistics.median(x["tokens_per_s"] for x in b)
            ra, rb = statistics.median(x["peak_rss_mib"] for x in a), statistics.median(x["peak_rss_mib"] for x in b)
            what = "kept" if keep else "recomputed"
            print(f"| {mode} | {th} | {what} | {ta:.1f} | {tb:.1f} | {ta / tb:.2f}x | {ra:.0f} | {rb:.0f} |")
