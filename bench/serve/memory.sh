#!/usr/bin/env bash
# Peak memory of `recompose serve` under load with long prompts, per KV policy: the same requests
# (REQUESTS prompts of WORDS words, ~1.3 tokens a word, at RATE req/s, max_tokens 32..128) against a
# fresh server for each policy; peak RSS from /usr/bin/time, load numbers from load.py.
#
#   bench/serve/memory.sh [RECOMPOSE_BIN]     # env: WORDS (3000), REQUESTS (16), RATE (2), KVS, MAX_BATCH (16)
#
# Writes bench/results/serve/memory-<policy>.json and prints one line per policy.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${1:-target/release/recompose}"
WORDS="${WORDS:-3000}"; REQUESTS="${REQUESTS:-16}"; RATE="${RATE:-2}"; MAX_BATCH="${MAX_BATCH:-16}"
KVS="${KVS:-full h2o:256,prefill=256 window:256,sinks=4,prefill=256}"
PY="$(bench/serve/setup_serve_peers.sh --print-venv)/bin/python"
OUT=bench/results/serve; mkdir -p "$OUT"
for kv in $KVS; do
    log="$(mktemp)"
    /usr/bin/time -v "$BIN" serve --model smollm2-135m --port 0 --kv "$kv" --max-batch "$MAX_BATCH" --max-queue 256 2> "$log" &
    tpid=$!
    for _ in $(seq 600); do grep -q "listening on" "$log" && break; sleep 0.1; done
    url="$(grep -o 'http://[0-9.:]*' "$log" | head -n1)"
    name="$(echo "$kv" | tr ':,=' '___')"
    "$PY" bench/serve/load.py --url "$url" --model smollm2-135m --requests "$REQUESTS" --rates "$RATE" \
        --prompt-words "$WORDS" --label "recompose kv=$kv" --json "$OUT/memory-$name.json" | tail -n 3
    pkill -INT -f "recompose serve --model smollm2-135m --port 0 --kv $kv" || true
    wait "$tpid" || true
    rss_kb="$(grep 'Maximum resident' "$log" | awk '{print $NF}')"
    echo "kv=$kv: peak RSS $((rss_kb / 1024)) MiB ($REQUESTS requests of $WORDS words at $RATE req/s, batch $MAX_BATCH)"
    "$PY" - "$OUT/memory-$name.json" "$rss_kb" <<'PY'
import json, sys
p, rss = sys.argv[1], int(sys.argv[2])
d = json.load(open(p)); d["peak_rss_mib"] = rss / 1024
json.dump(d, open(p, "w"), indent=2)
PY
    rm -f "$log"
done
