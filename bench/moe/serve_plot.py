#!/usr/bin/env python3
"""Plot bench/moe/serve_trace.sh's results: throughput, time to first token and inter-token
latency per configuration (one trace, one rate).

    python bench/moe/serve_plot.py bench/results/moe/serve docs/readme_serve.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIGS = [
    ("moe", "resident"), ("store-4-lru", "store 4/7"), ("store-4-lru-prefetch", "store 4/7\n+prefetch"),
    ("store-2-lru", "store 2/7"), ("store-2-lru-prefetch", "store 2/7\n+prefetch"),
    ("batch-decode-first", "decode-first"), ("batch-expert", "expert"),
    ("batch-decode-first-store-4", "decode-first\nstore 4/7"), ("batch-expert-store-4", "expert\nstore 4/7"),
    ("batch-expert-store-4-belady", "expert\nstore 4/7\nBelady"),
]


def main():
    d, out = sys.argv[1], sys.argv[2]
    rows = []
    for label, name in CONFIGS:
        p = os.path.join(d, f"{label}.json")
        if os.path.exists(p):
            rows.append((name, json.load(open(p))["results"][0]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    x = range(len(rows))
    names = [n for n, _ in rows]
    colors = ["#4c72b0" if "expert" not in n else "#dd8452" for n in names]
    axes[0].bar(x, [r["throughput_tok_s"] for _, r in rows], color=colors)
    axes[0].set_title("throughput (tok/s, higher is better)")
    axes[1].bar(x, [r["ttft_mean_s"] for _, r in rows], color=colors, label="mean")
    axes[1].scatter(x, [r["ttft_p95_s"] for _, r in rows], color="black", marker="_", s=200, label="p95")
    axes[1].set_title("time to first token (s)")
    axes[1].legend()
    axes[2].bar(x, [1000 * r["itl_mean_s"] for _, r in rows], color=colors, label="mean")
    axes[2].scatter(x, [1000 * r["itl_p95_s"] for _, r in rows], color="black", marker="_", s=200, label="p95")
    axes[2].set_title("inter-token latency (ms)")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels([n.replace("\n", " ") for n in names], fontsize=7, rotation=40, ha="right")
        ax.axvline(4.5, color="gray", lw=0.5)
    fig.suptitle("Read-ME MoE (smollm2-135m, 7 experts) under one request trace: 8 at once (left of the line), "
                 "8 of 32 per step (right); orange: expert-aware batching", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
