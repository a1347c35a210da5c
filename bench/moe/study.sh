#!/usr/bin/env bash
# The Read-ME study on SmolLM2-135M (docs/READ-ME.md), end to end on the CPU:
#   1. moefy: split by the seven built-in domains, pre-gating router, layer-wise gates, 100 steps
#      of expert fine-tuning for the MoE, the layer-wise MoE and the pruned baseline (~1 h on 2
#      cores);
#   2. speed: the dense model against the MoE, the layer-wise MoE and the pruned model
#      (bench/moe/speed.sh);
#   3. MMLU 5-shot on the val split, 5 questions per subject: dense, MoE, layer-wise, pruned.
#
#   bench/moe/study.sh [OUT]      # default out/readme-study; results under bench/results/moe/
set -euo pipefail
OUT="${1:-out/readme-study}"
BIN="${RECOMPOSE:-target/release/recompose}"
RES=bench/results/moe
mkdir -p "$RES"
DOMAINS=shakespeare,austen,mmlu,code,docs,fortunes,bigbench
if [ -z "${SKIP_MOEFY:-}" ]; then
    "$BIN" moefy --calib "$DOMAINS" --finetune-steps 100 -o "$OUT" | tee "$RES/moefy.txt"
    cp "$OUT/report.json" "$RES/smollm2-report.json"
    cp "$OUT"/finetune-{moe,layerwise,pruned}.log.jsonl "$RES/"
fi
for m in moe layerwise pruned; do
    case $m in moe) dir="$OUT" ;; *) dir="$OUT/$m" ;; esac
    bench/moe/speed.sh "$dir" "$RES/speed-$m.json" | tee "$RES/speed-$m.md"
done
for m in dense moe layerwise pruned; do
    case $m in dense) flag=() ;; moe) flag=(--moe "$OUT") ;; *) flag=(--moe "$OUT/$m") ;; esac
    "$BIN" -q eval mmlu "${flag[@]}" --split val --limit 5 --shots 5 --json "$RES/mmlu-$m.json"
done
python3 bench/moe/mmlu_pairs.py "$RES"/mmlu-{dense,moe,layerwise,pruned}.json | tee "$RES/mmlu.md"
