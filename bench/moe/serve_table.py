#!/usr/bin/env python3
"""The table of bench/moe/serve_trace.sh's results: one row per configuration and rate.

    python bench/moe/serve_table.py bench/results/moe/serve
"""
import json
import os
import sys

ORDER = ["dense", "moe", "store-7-lru", "store-4-lru", "store-4-lru-prefetch", "store-4-belady-prefetch",
         "store-2-lru", "store-2-lru-prefetch"] + [
    f"batch-{b}{s}" for b in ("decode-first", "prefill-first", "expert")
    for s in ("", "-store-4", "-store-4-belady")]


def ms(x):
    return "-" if x is None else f"{1000 * x:.0f}"


def main():
    d = sys.argv[1]
    print("| config | rate | tok/s | TTFT mean / p95 ms | ITL mean / p95 ms | experts / step | hit rate | loads "
          "| load s | waited s | hidden | RSS MiB | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in ORDER:
        p = os.path.join(d, f"{label}.json")
        if not os.path.exists(p):
            continue
        r = json.load(open(p))
        for x in r["results"]:
            e = x.get("experts") or {}
            store = bool(e) and (e.get("hits", 0) + e.get("loads", 0)) > 0
            load, wait = e.get("load_seconds", 0.0), e.get("wait_seconds", 0.0)
            cells = [
                label, f"{x['rate']:g}", f"{x['throughput_tok_s']:.1f}",
                f"{ms(x.get('ttft_mean_s'))} / {ms(x['ttft_p95_s'])}",
                f"{ms(x.get('itl_mean_s'))} / {ms(x['itl_p95_s'])}",
                f"{e['step_experts']:.2f}" if e.get("step_experts") else "-",
                f"{100 * e['hit_rate']:.1f}%" if store else "-",
                f"{e['loads']:.0f}" if store else "-",
                f"{load:.2f}" if store else "-",
                f"{wait:.2f}" if store else "-",
                f"{100 * max(0.0, 1 - wait / load):.0f}%" if store and load > 0 else "-",
                f"{r.get('server_rss_mib', 0):.0f}", f"{r.get('server_peak_rss_mib', 0):.0f}",
            ]
            if x["errors"]:
                cells[0] += f" ({x['errors']} errors)"
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
