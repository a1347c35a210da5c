#!/usr/bin/env python3
"""Side-by-side engine benchmark: recompose vs llama.cpp and HF transformers, in one run.

Runs `recompose bench` (release build) and bench/bench_peers.py alternately, --rounds times, on
the same model, prompt (first 128 tokens of hamlet_gut.txt) and thread counts, and prints a
markdown table of medians with recompose/peer ratios (paste it into docs/BENCHMARKS.md).

    cargo build --release -p recompose-cli
    VENV=$(bench/setup_peers.sh --print-venv)
    $VENV/bin/python bench/compare_engine.py --rounds 2 --json bench/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_recompose(model: str, threads: list[int], batches: list[int], runs: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [str(ROOT / "target/release/recompose"), "bench", "-q", "--model", model,
               "--bench-threads", ",".join(map(str, threads)), "--batch", ",".join(map(str, batches)),
               "--runs", str(runs), "--json", f.name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(f.name))["results"]


def run_peers(model: str, threads: list[int], runs: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(ROOT / "bench/bench_peers.py"), "--model", model,
               "--threads", ",".join(map(str, threads)), "--runs", str(runs), "--json", f.name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.load(open(f.name))["results"]
    # {"llamacpp": {"1": {...}}, "hf": {...}} -> flat rows
    return [dict(r, engine=e, threads=int(t)) for e, by_t in res.items() for t, r in by_t.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    ours: dict[tuple, list[dict]] = {}
    peers: dict[tuple, list[dict]] = {}
    for _ in range(a.rounds):
        for r in run_recompose(a.model, threads, [1, 8], a.runs):
            ours.setdefault((r["threads"], r["batch"]), []).append(r)
        for r in run_peers(a.model, threads, a.runs):
            peers.setdefault((r["engine"], r["threads"]), []).append(r)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    lines = ["| threads | metric | recompose | llama.cpp | transformers | recompose / llama.cpp |", "|---|---|---|---|---|---|"]
    for t in threads:
        o1, o8 = ours[(t, 1)], ours[(t, 8)]
        lc, hf = peers.get(("llamacpp", t), []), peers.get(("hf", t), [])
        for metric, ok, pk in [("prefill 128 tok/s", "prefill_tok_s", "prefill_tok_s"), ("decode tok/s (batch 1)", "decode_tok_s", "decode_tok_s")]:
            ov = med(o1, ok)
            lv = med(lc, pk) if lc else float("nan")
            hv = med(hf, pk) if hf else float("nan")
            lines.append(f"| {t} | {metric} | {ov:.1f} | {lv:.1f} | {hv:.1f} | {ov / lv:.2f}x |")
        lines.append(f"| {t} | decode tok/s (batch 8) | {med(o8, 'decode_tok_s'):.1f} | | | batch 8 / batch 1 = {med(o8, 'decode_tok_s') / med(o1, 'decode_tok_s'):.2f}x |")
        lines.append(f"| {t} | peak RSS MiB | {med(o1, 'peak_rss_mb'):.0f} | {med(lc, 'peak_rss_mib') if lc else float('nan'):.0f} | {med(hf, 'peak_rss_mib') if hf else float('nan'):.0f} | |")
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"recompose": {f"{k[0]}x{k[1]}": v for k, v in ours.items()},
                                            "peers": {f"{k[0]}x{k[1]}": v for k, v in peers.items()}}, indent=1))


if __name__ == "__main__":
    main()
