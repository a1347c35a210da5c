#!/usr/bin/env bash
# Serve smollm2-135m with `recompose serve` and with llama.cpp's OpenAI-compatible server
# (llama-cpp-python), replay the same Poisson load (bench/serve/load.py) against each, and
# print one side-by-side table; results go to bench/results/serve/{recompose,llamacpp,compare}.json.
#
#   bench/serve/compare.sh [RECOMPOSE_BIN]        # default target/release/recompose
#
# Environment: RATES (default 0.5,1,2), REQUESTS per rate (default 100: 200 does not fit
# in ~30 min on 2 cores: llama.cpp alone needs ~4 min per rate at 100), SEED (0), THREADS (2),
# ONLY=recompose|llamacpp to run one side, KV=SPEC to pass "kv" to recompose's requests.
# llama.cpp runs as: n_ctx 2048, 2 threads, --interrupt_requests False (otherwise a new
# request aborts the running stream), --logits_all False (the default True computes
# logits for every prompt position, ~2-3x slower prefill). llama-cpp-python's server has
# no n_parallel / continuous batching: it serves one request at a time behind a lock.
# Needs bench/serve/setup_serve_peers.sh (and bench/setup_peers.sh) to have run.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${1:-target/release/recompose}"
RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
SERVE_PY="$(bench/serve/setup_serve_peers.sh --print-venv)/bin/python"
PEERS_PY="${PEERS_VENV:-$RECOMPOSE_HOME/peers-venv}/bin/python"
GGUF="$(ls "$RECOMPOSE_HOME"/smollm2-135m/*.gguf | head -n1)"
RATES="${RATES:-0.5,1,2}"
REQUESTS="${REQUESTS:-100}"
SEED="${SEED:-0}"
THREADS="${THREADS:-2}"
OUT=bench/results/serve
LOGS="$(mktemp -d)"
mkdir -p "$OUT"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { "$SERVE_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready PID URL: poll GET URL/v1/models until 200 (the server may be loading weights).
wait_ready() {
    for _ in $(seq 1 300); do
        kill -0 "$1" 2>/dev/null || { echo "server $1 exited during startup" >&2; return 1; }
        curl -sf -o /dev/null "$2/v1/models" && return 0
        sleep 0.5
    done
    echo "server at $2 not ready after 150 s" >&2; return 1
}

# bench NAME PID URL [load.py args]: sample the peak RSS of PID while load.py runs, then stop PID.
bench() {
    local name=$1 pid=$2 url=$3; shift 3
    "$SERVE_PY" - "$pid" "$LOGS/$name.rss" <<'EOF' &
import sys, time, psutil
p, peak = psutil.Process(int(sys.argv[1])), 0
while True:  # sample every 0.2 s until the server exits or this sampler is killed
    try:
        peak = max(peak, p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))
    except psutil.Error:
        break
    open(sys.argv[2], "w").write(str(peak))
    time.sleep(0.2)
EOF
    local sampler=$!
    "$SERVE_PY" bench/serve/load.py --url "$url" --model smollm2-135m --requests "$REQUESTS" \
        --rates "$RATES" --seed "$SEED" --label "$name" --json "$OUT/$name.json" "$@"
    kill "$sampler" "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$name peak RSS: $(( $(cat "$LOGS/$name.rss") / 1048576 )) MiB"
}

# ONLY unset: both sides run (each test defaults to its own name).
if [[ "${ONLY:-recompose}" == recompose ]]; then
    "$BIN" serve --model smollm2-135m --host 127.0.0.1 --port 0 2> "$LOGS/recompose.log" &
    pid=$!; PIDS+=("$pid")
    for _ in $(seq 1 600); do grep -q "listening on http://" "$LOGS/recompose.log" && break; sleep 0.5; done
    url="$(grep -o 'http://127.0.0.1:[0-9]*' "$LOGS/recompose.log" | head -n1)"
    wait_ready "$pid" "$url" || { cat "$LOGS/recompose.log" >&2; exit 1; }
    bench recompose "$pid" "$url" ${KV:+--kv "$KV"}
fi

if [[ "${ONLY:-llamacpp}" == llamacpp ]]; then
    port="$(free_port)"
    "$PEERS_PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2-135m --host 127.0.0.1 \
        --port "$port" --n_ctx 2048 --n_threads "$THREADS" --n_threads_batch "$THREADS" \
        --interrupt_requests False --logits_all False --verbose False > "$LOGS/llamacpp.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_ready "$pid" "http://127.0.0.1:$port" || { cat "$LOGS/llamacpp.log" >&2; exit 1; }
    bench llamacpp "$pid" "http://127.0.0.1:$port"
fi

# Side-by-side table and compare.json (a side that did not run this time is read from its
# last JSON if present, else left out).
"$SERVE_PY" - "$OUT" "$LOGS" <<'EOF'
import json, os, sys
out, logs = sys.argv[1:]
sides = {}
for name in ("recompose", "llamacpp"):
    if os.path.exists(f"{out}/{name}.json"):
        sides[name] = json.load(open(f"{out}/{name}.json"))
        rss = f"{logs}/{name}.rss"
        if os.path.exists(rss):
            sides[name]["peak_rss_mib"] = int(open(rss).read()) / 2**20
ms = lambda x: "-" if x is None else f"{x * 1000:.0f}"
ratio = lambda a, b: None if a is None or not b else a / b
rows = []
print("\n| rate | server | tok/s | req/s | TTFT p50/p95 ms | ITL p50/p95 ms | errors | peak RSS MiB |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for i, r0 in enumerate(next(iter(sides.values()))["results"] if sides else []):
    row = {"rate": r0["rate"]}
    for name, s in sides.items():
        r = s["results"][i]; row[name] = r
        rss = s.get("peak_rss_mib")
        print(f"| {r['rate']:g} | {name} | {r['throughput_tok_s']:.1f} | {r['req_s']:.2f} | "
              f"{ms(r['ttft_p50_s'])}/{ms(r['ttft_p95_s'])} | {ms(r['itl_p50_s'])}/{ms(r['itl_p95_s'])} | "
              f"{r['errors']} | {'-' if rss is None else f'{rss:.0f}'} |")
    if len(sides) == 2:
        a, b = row["recompose"], row["llamacpp"]
        row["ratio_recompose_over_llamacpp"] = {k: ratio(a[k], b[k]) for k in ("throughput_tok_s", "ttft_p95_s", "itl_p95_s")}
        q = row["ratio_recompose_over_llamacpp"]
        f = lambda x: "-" if x is None else f"{x:.2f}x"
        print(f"| {r0['rate']:g} | ratio r/l | {f(q['throughput_tok_s'])} | | p95 {f(q['ttft_p95_s'])} | p95 {f(q['itl_p95_s'])} | | |")
    rows.append(row)
json.dump({"servers": {k: {kk: v for kk, v in s.items() if kk != "results"} for k, s in sides.items()},
           "rows": rows}, open(f"{out}/compare.json", "w"), indent=2)
print(f"\nwrote {out}/compare.json")
EOF
