"""The Read-ME study in two pictures (docs/readme_moe.png): the training loss of the MoE's expert
fine-tuning against the layer-wise MoE's and the pruned baseline's (same rows, same steps), and
held-out perplexity per domain for the dense model, the pruned model and the MoE before and after
fine-tuning, and the layer-wise MoE after.

    python3 bench/moe/plot.py bench/results/moe docs/readme_moe.png   # matplotlib (peers venv)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

res, out = sys.argv[1], sys.argv[2]


def steps(path):
    rows = [json.loads(l) for l in open(path)]
    return [r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r]


def smooth(v, k=9):
    return [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]


rep = json.load(open(f"{res}/smollm2-report.json"))
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
for name, label in [
    ("moe", "MoE experts (pre-gate frozen)"),
    ("layerwise", "layer-wise MoE experts (gates frozen)"),
    ("pruned", "pruned to the same size"),
]:
    x, y = steps(f"{res}/finetune-{name}.log.jsonl")
    a.plot(x, smooth(y), label=label)
a.set_xlabel("step (4 rows x 255 tokens)")
a.set_ylabel("training loss (moving mean of 9)")
a.set_title("fine-tuning, same rows and budget")
a.legend()
doms = [q["domain"] for q in rep["quality"]]
ft = rep["finetuned"]
bars = [
    ("dense", ft["dense_f32"]),
    ("pruned", [q["pruned"] for q in rep["quality"]]),
    ("MoE (router)", [q["router"]["ppl"] for q in rep["quality"]]),
    ("pruned, fine-tuned", ft["pruned"]),
    ("layer-wise, fine-tuned", ft["layerwise"]),
    ("MoE, fine-tuned", ft["moe"]),
]
w = 0.8 / len(bars)
for i, (label, v) in enumerate(bars):
    b.bar([d + (i - (len(bars) - 1) / 2) * w for d in range(len(doms))], v, w, label=label)
b.set_xticks(range(len(doms)), doms, rotation=30)
b.set_yscale("log")
b.set_ylabel("held-out perplexity")
b.set_title("SmolLM2-135M, 50% of the FFN active")
b.legend(fontsize=8, ncol=3, loc="upper right")
b.set_ylim(top=b.get_ylim()[1] * 6)  # room for the legend above the bars
fig.tight_layout()
fig.savefig(out, dpi=110)
