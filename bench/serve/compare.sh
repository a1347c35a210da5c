#!/usr/bin/env bash
# Serve smollm2-135m (one GGUF file, the same for every server) with `recompose serve` and with
# its peers, replay the same Poisson load (bench/serve/load.py) against each, and print one
# side-by-side table with recompose/peer ratios per rate; results go to
# $OUT_DIR/{recompose,llama-server,llamacpp,compare}.json (OUT_DIR default bench/results/serve).
#
#   bench/serve/compare.sh [RECOMPOSE_BIN]        # default target/release/recompose
#
# Sides (SIDES, comma-separated, default recompose,llama-server):
#   recompose     RECOMPOSE_BIN serve --model GGUF --threads THREADS --port 0
#   llama-server  llama.cpp's native server (bench/serve/build_llama_server.sh builds it):
#                 -m GGUF -t THREADS -tb THREADS -c SLOT_CTX*P --parallel P --cont-batching
#                 --no-cache-prompt --cache-ram 0 (llama-server splits -c evenly over the P
#                 slots, so each slot gets SLOT_CTX). Its prompt cache is off because the trace
#                 is replayed once per rate (and its first request once more as the warm-up):
#                 with it, later rates would find their prompts' KV cached from earlier ones;
#                 PROMPT_CACHE=1 keeps llama-server's default (prompt cache on, 8 GiB host cache)
#                 and recompose's (--prefix-cache 256); otherwise recompose runs --no-prefix-cache.
#                 STEP_TOKENS=N passes --step-tokens N to recompose.
#                 PARALLEL=N fixes P; PARALLEL=best (default) first runs the highest rate of
#                 RATES with P = 1, 2, 4, 8 (PROBE_REQUESTS requests, default REQUESTS), keeps
#                 the P with the best throughput, then runs every rate with it.
#   llamacpp      llama-cpp-python's server (one request at a time behind a lock; no
#                 n_parallel): n_ctx SLOT_CTX, --interrupt_requests False (otherwise a new
#                 request aborts the running stream), --logits_all False (the default True
#                 computes logits for every prompt position, ~2-3x slower prefill).
# ONLY=NAME runs one side and compares it with the others' last JSON in OUT_DIR (if present).
#
# Environment: RATES (default 0.5,1,2), REQUESTS per rate (default 100: 200 does not fit in
# ~30 min on 2 cores: llama.cpp alone needs ~4 min per rate at 100), SEED (0), THREADS (2),
# KV=SPEC to pass "kv" to recompose's requests, SHARED_PREFIX_TOKENS=N (load.py
# --shared-prefix-tokens), SLOT_CTX (tokens of context per request on the llama.cpp side,
# default 2048 + 2 N: the longest request, a ~512-token prompt + 128 generated, fits), OUT_DIR.
# Needs bench/serve/setup_serve_peers.sh (client venv; llamacpp also needs bench/setup_peers.sh)
# and, for llama-server, bench/serve/build_llama_server.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${1:-target/release/recompose}"
RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
SERVE_PY="$(bench/serve/setup_serve_peers.sh --print-venv)/bin/python"
PEERS_PY="${PEERS_VENV:-$RECOMPOSE_HOME/peers-venv}/bin/python"
LLAMA_BIN="$(bench/serve/build_llama_server.sh --print-bin)"
GGUF="$(ls "$RECOMPOSE_HOME"/smollm2-135m/*.gguf | head -n1)"
RATES="${RATES:-0.5,1,2}"
REQUESTS="${REQUESTS:-100}"
PROBE_REQUESTS="${PROBE_REQUESTS:-$REQUESTS}"
SEED="${SEED:-0}"
THREADS="${THREADS:-2}"
PARALLEL="${PARALLEL:-best}"
PREFIX="${SHARED_PREFIX_TOKENS:-0}"
SLOT_CTX="${SLOT_CTX:-$(( 2048 + 2 * PREFIX ))}"
OUT="${OUT_DIR:-bench/results/serve}"
SIDES="${SIDES:-recompose,llama-server}"
TABLE="$SIDES"
if [[ -n "${ONLY:-}" ]]; then SIDES="$ONLY"; TABLE="recompose,llama-server,llamacpp"; fi
TOP_RATE="$(tr ',' '\n' <<< "$RATES" | sort -g | tail -n1)"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"

has_side() { [[ ",$SIDES," == *",$1,"* ]]; }
for s in ${SIDES//,/ }; do
    case "$s" in recompose|llama-server|llamacpp) ;; *) echo "unknown side '$s' in SIDES" >&2; exit 2 ;; esac
done
if has_side llama-server && [[ ! -x "$LLAMA_BIN/llama-server" ]]; then
    echo "no $LLAMA_BIN/llama-server: run bench/serve/build_llama_server.sh first" >&2; exit 1
fi

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

# start NAME [P]: start one server on a free port, wait until it answers; sets PID, URL, CMD.
start() {
    local name=$1 p=${2:-1} port
    port="$(free_port)"
    case "$name" in
        recompose)
            CMD=("$BIN" serve --model "$GGUF" --threads "$THREADS" --host 127.0.0.1 --port "$port")
            # Each rate replays the same prompts: a prefix cache would serve later rates from
            # earlier ones, so it is off unless PROMPT_CACHE=1 (as llama-server's below).
            [[ "${PROMPT_CACHE:-0}" == 1 ]] && CMD+=(--prefix-cache 256) || CMD+=(--no-prefix-cache)
            [[ -z "${STEP_TOKENS:-}" ]] || CMD+=(--step-tokens "$STEP_TOKENS") ;;
        llama-server)
            CMD=("$LLAMA_BIN/llama-server" -m "$GGUF" --alias smollm2-135m -t "$THREADS" -tb "$THREADS"
                 -c $(( SLOT_CTX * p )) --parallel "$p" --cont-batching --host 127.0.0.1 --port "$port")
            [[ "${PROMPT_CACHE:-0}" == 1 ]] || CMD+=(--no-cache-prompt --cache-ram 0) ;;
        llamacpp)
            CMD=("$PEERS_PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2-135m
                 --host 127.0.0.1 --port "$port" --n_ctx "$SLOT_CTX" --n_threads "$THREADS"
                 --n_threads_batch "$THREADS" --interrupt_requests False --logits_all False --verbose False) ;;
    esac
    "${CMD[@]}" > "$LOGS/$name.log" 2>&1 &
    PID=$!; PIDS+=("$PID")
    URL="http://127.0.0.1:$port"
    wait_ready "$PID" "$URL" || { tail -n 40 "$LOGS/$name.log" >&2; exit 1; }
}

# bench NAME JSON RATES REQUESTS [load.py args]: run load.py against the server started last
# (PID, URL, CMD) while sampling its peak RSS, stop it, and record the server command in JSON.
bench() {
    local name=$1 json=$2 rates=$3 n=$4 model; shift 4
    model="$(curl -sf "$URL/v1/models" | "$SERVE_PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
    "$SERVE_PY" - "$PID" "$LOGS/$name.rss" <<'EOF' &
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
    "$SERVE_PY" bench/serve/load.py --url "$URL" --model "$model" --requests "$n" --rates "$rates" \
        --seed "$SEED" --shared-prefix-tokens "$PREFIX" --label "$name" --json "$json" "$@"
    kill "$sampler" "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    echo "$name peak RSS: $(( $(cat "$LOGS/$name.rss") / 1048576 )) MiB"
    "$SERVE_PY" - "$json" "$LOGS/$name.rss" "$GGUF" "${CMD[@]}" <<'EOF'
import json, sys
path, rss, gguf, cmd = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
d = json.load(open(path))
d.update(server_cmd=" ".join(cmd), gguf=gguf, peak_rss_mib=int(open(rss).read()) / 2**20)
json.dump(d, open(path, "w"), indent=2)
EOF
}

if has_side recompose; then
    start recompose
    bench recompose "$OUT/recompose.json" "$RATES" "$REQUESTS" ${KV:+--kv "$KV"}
fi

if has_side llama-server; then
    if [[ "$PARALLEL" == best ]]; then
        probes=()
        for p in 1 2 4 8; do
            start llama-server "$p"
            bench "llama-server-p$p" "$LOGS/probe-$p.json" "$TOP_RATE" "$PROBE_REQUESTS"
            probes+=("$LOGS/probe-$p.json")
        done
        P="$("$SERVE_PY" -c 'import json,sys
best = max(sys.argv[1:], key=lambda f: json.load(open(f))["results"][0]["throughput_tok_s"])
print(best.rsplit("-", 1)[1].removesuffix(".json"))' "${probes[@]}")"
        echo "llama-server: best --parallel at $TOP_RATE req/s is $P"
    else
        P="$PARALLEL"; probes=()
    fi
    start llama-server "$P"
    bench llama-server "$OUT/llama-server.json" "$RATES" "$REQUESTS"
    "$SERVE_PY" - "$OUT/llama-server.json" "$P" "$PARALLEL" "${probes[@]}" <<'EOF'
import json, sys
path, p, mode, probes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
d = json.load(open(path))
d["parallel"], d["parallel_mode"] = p, mode
d["parallel_probe"] = {json.load(open(f))["label"]: json.load(open(f))["results"][0] for f in probes}
json.dump(d, open(path, "w"), indent=2)
EOF
fi

if has_side llamacpp; then
    start llamacpp
    bench llamacpp "$OUT/llamacpp.json" "$RATES" "$REQUESTS"
fi

# Side-by-side table and compare.json: the sides in TABLE whose JSON is in OUT_DIR, rows matched
# by rate; recompose / peer ratios for every peer present.
"$SERVE_PY" - "$OUT" "$TABLE" <<'EOF'
import json, os, sys
out, table = sys.argv[1], sys.argv[2].split(",")
sides = {n: json.load(open(f"{out}/{n}.json")) for n in table if os.path.exists(f"{out}/{n}.json")}
ms = lambda x: "-" if x is None else f"{x * 1000:.0f}"
ratio = lambda a, b: None if a is None or not b else a / b
f = lambda x: "-" if x is None else f"{x:.2f}x"
trace = {n: (s["requests"], s["seed"], s.get("shared_prefix_tokens", 0), tuple(s.get("prompt_words") or ())) for n, s in sides.items()}
if len(set(trace.values())) > 1:
    print(f"WARNING: the sides did not replay the same trace: {trace}")
for n, s in sides.items():
    if "parallel_probe" in s and s["parallel_probe"]:
        print(f"{n} --parallel probe: " + ", ".join(f"{k}: {v['throughput_tok_s']:.1f} tok/s" for k, v in s["parallel_probe"].items())
              + f" -> --parallel {s['parallel']}")
rates = sorted({r["rate"] for s in sides.values() for r in s["results"]})
peers = [n for n in sides if n != "recompose"]
rows = []
print("\n| rate | server | tok/s | req/s | TTFT p50/p95 ms | ITL p50/p95 ms | errors | peak RSS MiB |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for rate in rates:
    row = {"rate": rate}
    for name, s in sides.items():
        r = next((r for r in s["results"] if r["rate"] == rate), None)
        if r is None:
            continue
        row[name] = r
        rss = s.get("peak_rss_mib")
        label = name + (f" -np {s['parallel']}" if "parallel" in s else "")
        print(f"| {rate:g} | {label} | {r['throughput_tok_s']:.1f} | {r['req_s']:.2f} | "
              f"{ms(r['ttft_p50_s'])}/{ms(r['ttft_p95_s'])} | {ms(r['itl_p50_s'])}/{ms(r['itl_p95_s'])} | "
              f"{r['errors']} | {'-' if rss is None else f'{rss:.0f}'} |")
    for peer in peers:
        if "recompose" in row and peer in row:
            a, b = row["recompose"], row[peer]
            q = row[f"ratio_recompose_over_{peer}"] = {
                k: ratio(a[k], b[k]) for k in ("throughput_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s")}
            print(f"| {rate:g} | recompose / {peer} | {f(q['throughput_tok_s'])} | | "
                  f"{f(q['ttft_p50_s'])}/{f(q['ttft_p95_s'])} | {f(q['itl_p50_s'])}/{f(q['itl_p95_s'])} | | |")
    rows.append(row)
json.dump({"servers": {k: {kk: v for kk, v in s.items() if kk != "results"} for k, s in sides.items()},
           "rows": rows}, open(f"{out}/compare.json", "w"), indent=2)
print(f"\nwrote {out}/compare.json")
EOF
