#!/usr/bin/env bash
# The expert store at a 7B model's expert size: a synthetic store of Llama-2-7B's FFN cut into
# 8 experts (32 layers x 8 experts of 1376 x 4096 channels, Q4_0; 2.27 GiB on disk, 290 MiB per
# expert), replayed through decode steps under budgets of 2, 4 and 8 experts per layer, with
# and without prefetch, against reading every expert on every use (`--expert-cache none`).
# Each row keeps its expert with probability 0.7 per token (smollm2's MoE measured 0.48-0.90).
#
#   bench/moe/store_7b.sh [OUT_DIR]      # about 5 minutes on 2 cores, 2.3 GiB of disk in out/
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-bench/results/moe/store7b}"
BIN=target/release/recompose
STORE=out/store7b/experts.store
mkdir -p "$OUT" "$(dirname "$STORE")"
[[ -x "$BIN" ]] || cargo build --release -p recompose-cli
[[ -f "$STORE" ]] || "$BIN" moe-store synth -o "$STORE"

for batch in 1 8; do
    for cfg in "none 1" "lru 2" "lru 2 --prefetch" "lru 4" "lru 4 --prefetch" "lru 8" "lru 8 --prefetch"; do
        set -- $cfg
        policy=$1 budget=$2 pf=${3:-}
        label="b${batch}-${policy}-${budget}${pf:+-prefetch}"
        echo -n "$label: "
        "$BIN" moe-store replay "$STORE" --expert-budget "$budget" --expert-cache "$policy" $pf \
            --batch "$batch" --steps 32 --warmup 8 --json "$OUT/$label.json"
    done
done
