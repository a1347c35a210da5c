"""Read-ME serving replayed offline (docs/readme_trace.png): expert-cache hit rate by capacity for
each eviction policy under expert-aware batching, and the distinct experts a step needs under each
batching policy, from `recompose moe-trace --json` reports (one per arrival rate).

    python3 bench/moe/trace_plot.py docs/readme_trace.png bench/results/moe/trace-*.json  # matplotlib
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, reports = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
reports.sort(key=lambda r: r["rate"])
fig, axes = plt.subplots(1, len(reports) + 1, figsize=(4.6 * (len(reports) + 1), 4.2))
for ax, rep in zip(axes, reports):
    expert = next(b for b in rep["batching"] if b["batching"] == "expert")
    for policy, style in [("random", ":"), ("lru", "--"), ("lfu", "-."), ("belady", "-")]:
        runs = sorted((c for c in expert["cache"] if c["policy"] == policy), key=lambda c: c["capacity"])
        ax.plot([c["capacity"] for c in runs], [100 * c["hit_rate"] for c in runs], style, marker="o", label=policy)
    ax.set_xticks(sorted({c["capacity"] for c in expert["cache"]}))
    ax.set_title(f"{rep['rate']} arrivals/step, expert batching")
    ax.set_xlabel("resident experts (of %d)" % len(rep["domains"]))
    ax.set_ylabel("hit rate (%)")
    ax.grid(alpha=0.3)
    ax.legend()
ax = axes[-1]
names = [b["batching"] for b in reports[0]["batching"]]
width = 0.8 / len(reports)
for i, rep in enumerate(reports):
    ys = [b["unique_experts"] for b in rep["batching"]]
    ax.bar([j + i * width for j in range(len(names))], ys, width, label=f"{rep['rate']} arrivals/step")
ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(names))], names)
ax.set_ylabel("distinct experts per step")
ax.set_title("batching policy")
ax.legend(loc="lower left")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)
