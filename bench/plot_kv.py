#!/usr/bin/env python3
"""Tables and the figure for docs/KV.md from bench/results/kv/ (written by bench/kv_*.sh and
`recompose bench --json`). Prints markdown; draws docs/kv_ppl.png when matplotlib is present.

    python3 bench/plot_kv.py            # tables to stdout, figure to docs/kv_ppl.png
"""
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "results", "kv")
BUDGETS = ["64", "128", "256", "512", "0.1", "0.2", "0.5"]


def load(kind):
    out = {}
    for f in sorted(glob.glob(os.path.join(ROOT, kind, "*.json"))):
        name = os.path.basename(f)[:-5]
        model, spec = name.split("_", 1)
        with open(f) as fh:
            out[(model, spec)] = json.load(fh)
    return out


def policy_of(spec):
    """('window'|'window+sinks'|'h2o'|'full', budget string) from a file-name spec."""
    if spec == "full":
        return "full", None
    m = re.match(r"(window|h2o)_([0-9.]+)(_sinks_4)?$", spec)
    if not m:
        return None, None
    name = m.group(1) + ("+sinks" if m.group(3) else "")
    return name, m.group(2)


def ppl_table(ppl):
    models = sorted({m for m, _ in ppl})
    for model in models:
        runs = {s: r for (m, s), r in ppl.items() if m == model}
        full = runs.get("full")
        any_run = next(iter(runs.values()))
        n = any_run["report"]["n_scored"] + 1
        chunk = any_run["report"]["chunk"]
        how = "token by token" if chunk == 1 else f"{chunk} tokens per step"
        base = f"full cache: perplexity {full['report']['ppl']:.3f}" if full else "full cache: not measured"
        print(f"\n**{model}**, {n} tokens streamed {how}, {base}\n")
        print("| budget | slots | window (recent only) | sinks (4) + window | h2o (half heavy, half recent) |")
        print("|---|---|---|---|---|")
        for b in BUDGETS:
            slots = b if "." not in b else str(round(float(b) * n))
            label = b if "." not in b else f"{float(b) * 100:.0f}%"
            cells = []
            for pol in ["window", "window+sinks", "h2o"]:
                r = next((r for s, r in runs.items() if policy_of(s) == (pol, b)), None)
                ratio = f" ({r['report']['ppl'] / full['report']['ppl']:.3f}x)" if r and full else ""
                cells.append("" if r is None else f"{r['report']['ppl']:.3f}{ratio}")
            if any(cells):
                print(f"| {label} | {slots} | " + " | ".join(cells) + " |")


def plot(ppl, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no figure)", file=sys.stderr)
        return
    models = sorted({m for m, _ in ppl})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = {s: r for (m, s), r in ppl.items() if m == model}
        full = runs.get("full")
        n = next(iter(runs.values()))["report"]["n_scored"] + 1
        for pol, style in [("window", "o:"), ("window+sinks", "s--"), ("h2o", "^-")]:
            pts = []
            for s, r in runs.items():
                p, b = policy_of(s)
                if p == pol:
                    slots = float(b) * n if "." in b else int(b)
                    pts.append((slots, r["report"]["ppl"]))
            pts.sort()
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=pol)
        if full:
            ax.axhline(full["report"]["ppl"], color="k", lw=1, label="full")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV slots per layer and KV head (budget)")
        ax.set_ylabel("perplexity (streamed)")
        ax.set_title(f"{model}: {n} tokens of Emma")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"(figure written to {path})", file=sys.stderr)


def passkey_table(pk):
    """Correct/trials per prompt length, over the depths every run shares."""
    if not pk:
        return
    common = set.intersection(*({c["depth"] for c in r["cells"]} for r in pk.values()))
    lengths = sorted({c["length"] for r in pk.values() for c in r["cells"]})
    depths = ", ".join(f"{d:.0%}" for d in sorted(common))
    print(f"\nDepths {depths}; one trial per cell.\n")
    print("| model | policy | " + " | ".join(f"{n} tokens" for n in lengths) + " | all |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    for (model, spec), r in sorted(pk.items()):
        by_len = {}
        for c in r["cells"]:
            if c["depth"] in common:
                a = by_len.setdefault(c["length"], [0, 0])
                a[0] += c["correct"]
                a[1] += c["trials"]
        cells = [f"{by_len[k][0]}/{by_len[k][1]}" if k in by_len else "" for k in lengths]
        ok, n = sum(v[0] for v in by_len.values()), sum(v[1] for v in by_len.values())
        print(f"| {model} | `{r['kv']}` | " + " | ".join(cells) + f" | {ok}/{n} |")


def mmlu_table(mm):
    if not mm:
        return
    print("\n| model | policy | accuracy (95% CI) | same answer as full | ")
    print("|---|---|---|---|")
    for (model, spec), r in sorted(mm.items()):
        rep = r["report"]
        full = mm.get((model, "full"))
        agree = ""
        if full:
            a, b = rep["picks"], full["report"]["picks"]
            same = sum(x == y for x, y in zip(a, b))
            p = same / len(a)
            agree = f"{same}/{len(a)} ({p:.2f} ± {1.96 * math.sqrt(p * (1 - p) / len(a)):.2f})"
        print(f"| {model} | `{r['kv']}` | {rep['accuracy']:.3f} ± {rep['ci95']:.3f} (n={rep['total']}) | {agree} |")


def bench_table():
    for f in sorted(glob.glob(os.path.join(ROOT, "speed", "*.json"))):
        with open(f) as fh:
            d = json.load(fh)
        rs = d["results"]
        print(f"\n**{d['model']}** decode speed against context (`{os.path.basename(f)}`)\n")
        ctxs = sorted({r["prompt_tokens"] for r in rs})
        kvs = list(dict.fromkeys(r["kv"] for r in rs))
        print("| context | " + " | ".join(f"`{k}` tok/s (KV MiB)" for k in kvs) + " |")
        print("|---|" + "---|" * len(kvs))
        for c in ctxs:
            row = []
            for k in kvs:
                r = next((r for r in rs if r["prompt_tokens"] == c and r["kv"] == k), None)
                row.append("" if r is None else f"{r['decode_tok_s']:.1f} ({r['kv_bytes'] / 2**20:.1f})")
            print(f"| {c} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    ppl = load("ppl")
    ppl_table(ppl)
    plot(ppl, os.path.join(os.path.dirname(__file__), "..", "docs", "kv_ppl.png"))
    passkey_table(load("passkey"))
    mmlu_table(load("mmlu"))
    bench_table()
