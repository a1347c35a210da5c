#!/usr/bin/env python3
"""The table of bench/moe/store_7b.sh's replays: one row per batch, policy, budget and prefetch.

    python bench/moe/store_table.py bench/results/moe/store7b

Besides what a replay reports, `compute tok/s` is the tokens over the time the layers did not
wait for experts (the speed were every expert resident), and `x none` the speed over reading
every expert on every use at the same batch.
"""
import json
import os
import sys


def main():
    d = sys.argv[1]
    rows = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            r = json.load(open(os.path.join(d, name)))
            rows.append((name[:-5], r))
    base = {r["batch"]: r["tok_s"] for n, r in rows if r["stats"]["policy"] == "none"}
    print("| batch | cache | resident / 8 | prefetch | tok/s | x none | step p95 ms | hit rate | read GiB | waited s "
          "| hidden | compute tok/s | RSS MiB |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    key = lambda nr: (nr[1]["batch"], nr[1]["stats"]["policy"] != "none", nr[1]["stats"]["capacity"],  # noqa: E731
                      nr[1]["stats"]["prefetch"])
    for _, r in sorted(rows, key=key):
        s = r["stats"]
        total = r["steps"] * r["step_ms_mean"] / 1000
        compute = r["steps"] * r["batch"] / max(1e-9, total - s["wait_seconds"])
        hidden = max(0.0, 1 - s["wait_seconds"] / s["load_seconds"]) if s["load_seconds"] > 0 else 0.0
        none = s["policy"] == "none"
        print(f"| {r['batch']} | {s['policy']} | {'0' if none else s['capacity']} | {'yes' if s['prefetch'] else 'no'} "
              f"| {r['tok_s']:.2f} | {r['tok_s'] / base[r['batch']]:.2f}x | {r['step_ms_p95']:.0f} "
              f"| {100 * s['hits'] / max(1, s['hits'] + s['loads']):.1f}% | {s['bytes_read'] / 2**30:.2f} "
              f"| {s['wait_seconds']:.2f} | {100 * hidden:.0f}% | {compute:.1f} | {r['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
