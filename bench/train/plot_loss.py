#!/usr/bin/env python3
"""The loss curve of a `recompose finetune` JSONL log: training loss per step (and a moving
average), held-out loss at each evaluation.

    plot_loss.py RUN.log.jsonl docs/train_loss.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "loss" in r]
evals = [r for r in rows if "eval_loss" in r]
x = [r["step"] for r in steps]
y = [r["loss"] for r in steps]
k = 10
avg = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(x, y, color="#9ecae1", lw=1, label="training loss (batch)")
ax.plot(x, avg, color="#3182bd", lw=2, label=f"training loss ({k}-step mean)")
ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#e6550d", lw=2,
        label="held-out loss (Twelfth Night)")
ax.set_xlabel("optimiser step (4 x 512 tokens)")
ax.set_ylabel("cross-entropy (nats / token)")
ax.set_title("LoRA r=16 on eleven Shakespeare comedies, smollm2-135m")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
print(f"wrote {sys.argv[2]}")
