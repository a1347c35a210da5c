#!/usr/bin/env bash
# Decode and prefill speed of a MoE folder against the dense model it came from, side by side:
# `recompose bench --moe DIR` measures the dense model then the MoE in one process; this runs it
# ROUNDS times (default 3) so each ratio comes from a pair measured back to back, and prints the
# median ratio per configuration (the machine's noise is about +-20% between runs).
#
#   bench/moe/speed.sh DIR [OUT.json]     # DIR from `recompose moefy`; also DIR/layerwise, DIR/pruned
#
# Settings: batch 1 and 8, 128-token prompts, 64 generated tokens, 1 and 2 threads, 3 timed runs.
set -euo pipefail
DIR="$1"
OUT="${2:-}"
ROUNDS="${ROUNDS:-3}"
BIN="${RECOMPOSE:-target/release/recompose}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for r in $(seq 1 "$ROUNDS"); do
    "$BIN" -q bench --moe "$DIR" --batch 1,8 --prompt-tokens 128 --gen-tokens 64 --bench-threads 1,2 --runs 3 \
        --json "$TMP/round$r.json" >&2
done
python3 - "$TMP" "$ROUNDS" "$OUT" <<'PY'
import json, statistics, sys
tmp, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = [json.load(open(f"{tmp}/round{r}.json"))["results"] for r in range(1, rounds + 1)]
key = lambda x: (x["threads"], x["batch"], x["prompt_tokens"])
rows = []
for cfg in sorted({key(x) for x in runs[0]}):
    pick = lambda rs, m: next(x for x in rs if key(x) == cfg and x["model"] == m)
    pairs = [(pick(rs, "dense"), pick(rs, "moe")) for rs in runs]
    med = lambda f: statistics.median(f(d, m) for d, m in pairs)
    rows.append({
        "threads": cfg[0], "batch": cfg[1], "prompt": cfg[2],
        "dense_decode": med(lambda d, m: d["decode_tok_s"]), "moe_decode": med(lambda d, m: m["decode_tok_s"]),
        "decode_ratio": med(lambda d, m: m["decode_tok_s"] / d["decode_tok_s"]),
        "dense_prefill": med(lambda d, m: d["prefill_tok_s"]), "moe_prefill": med(lambda d, m: m["prefill_tok_s"]),
        "prefill_ratio": med(lambda d, m: m["prefill_tok_s"] / d["prefill_tok_s"]),
        "router_share": med(lambda d, m: m["router_share"] or 0.0),
        "dense_rss_mb": med(lambda d, m: d["peak_rss_mb"]), "moe_rss_mb": med(lambda d, m: m["peak_rss_mb"]),
    })
print("| threads | batch | dense decode tok/s | MoE decode tok/s | ratio | dense prefill tok/s | MoE prefill tok/s | ratio | router share |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['threads']} | {r['batch']} | {r['dense_decode']:.1f} | {r['moe_decode']:.1f} | {r['decode_ratio']:.2f}x "
          f"| {r['dense_prefill']:.1f} | {r['moe_prefill']:.1f} | {r['prefill_ratio']:.2f}x | {100 * r['router_share']:.2f}% |")
if out:
    json.dump({"rounds": rounds, "rows": rows, "raw": runs}, open(out, "w"), indent=1)
PY
