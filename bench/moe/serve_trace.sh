#!/usr/bin/env bash
# Read-ME serving against the real server: the same Poisson trace of requests (prompts from the
# seven calibration domains' held-out tenths and MMLU test questions, bench/serve/load.py
# --domains) replayed against `recompose serve` as the dense model, the resident MoE, and the
# MoE run from its expert store under several budgets, cache policies and with or without
# prefetch. Per configuration: throughput, TTFT and inter-token latency (p50/p95), the store's
# hits, loads and load/wait seconds over each rate (from /metrics), and the server's memory
# (VmRSS after the trace, VmHWM over the whole run).
#
#   bench/moe/serve_trace.sh [MOE_DIR] [OUT_DIR]
#
# Then the three batching policies with 32 requests admitted and 8 per step, resident and from
# the store. MOE_DIR defaults to out/readme-study (bench/moe/study.sh makes it); its experts.store is
# written first if missing. REQUESTS (default 32) and RATES (default 1,4) set the trace.
# Needs the serve venv (bench/serve/setup_serve_peers.sh). With REQUESTS=24 RATES=2 (the recorded
# run) it takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."

MOE="${1:-out/readme-study}"
OUT="${2:-bench/results/moe/serve}"
REQUESTS="${REQUESTS:-32}"
RATES="${RATES:-1,4}"
DOMAINS="shakespeare,austen,mmlu,code,docs,fortunes,bigbench"
BIN=target/release/recompose
PY="$(bench/serve/setup_serve_peers.sh --print-venv)/bin/python"
PORT=8093
mkdir -p "$OUT"

[[ -x "$BIN" ]] || cargo build --release -p recompose-cli
[[ -f "$MOE/experts.store" ]] || "$BIN" moe-store write --moe "$MOE"

# run LABEL [serve flags]: MAXB (default 8) requests run at once.
run() {
    local label="$1"; shift
    # ONLY="label ..." runs just those configurations.
    [[ -z "${ONLY:-}" || " $ONLY " == *" $label "* ]] || return 0
    "$BIN" serve --port "$PORT" --max-batch "${MAXB:-8}" "$@" >"$OUT/$label.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 1
    done
    "$PY" bench/serve/load.py --url "http://127.0.0.1:$PORT" --model smollm2-135m --requests "$REQUESTS" \
        --rates "$RATES" --seed 0 --domains "$DOMAINS" --metrics --label "$label" --json "$OUT/$label.json" \
        | tail -n 4
    local rss hwm
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" || true
    "$PY" - "$OUT/$label.json" "$rss" "$hwm" <<'EOF'
import json, sys
p, rss, hwm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = json.load(open(p))
d["server_rss_mib"], d["server_peak_rss_mib"] = rss / 1024, hwm / 1024
json.dump(d, open(p, "w"), indent=2)
EOF
}

run dense
run moe --moe "$MOE"
run store-7-lru --moe "$MOE" --expert-budget 7
run store-4-lru --moe "$MOE" --expert-budget 4
run store-4-lru-prefetch --moe "$MOE" --expert-budget 4 --prefetch
run store-4-belady-prefetch --moe "$MOE" --expert-budget 4 --expert-cache belady --prefetch
run store-2-lru --moe "$MOE" --expert-budget 2
run store-2-lru-prefetch --moe "$MOE" --expert-budget 2 --prefetch
# Batching: 32 requests admitted, 8 per step, chosen by each policy (the router runs ahead
# under all three, so they differ only in the choice).
# Routed ahead, the live Belady also sees the experts of the requests each step passes over.
for b in decode-first prefill-first expert; do
    MAXB=32 run "batch-$b" --moe "$MOE" --step-rows 8 --batching "$b"
    MAXB=32 run "batch-$b-store-4" --moe "$MOE" --step-rows 8 --batching "$b" --expert-budget 4 --prefetch
    MAXB=32 run "batch-$b-store-4-belady" --moe "$MOE" --step-rows 8 --batching "$b" --expert-budget 4 \
        --expert-cache belady --prefetch
done
"$PY" bench/moe/serve_table.py "$OUT"
