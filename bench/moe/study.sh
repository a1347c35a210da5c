#!/usr/bin/env bash
# The Read-ME study on SmolLM2-135M (docs/READ-ME.md), end to end on the CPU:
#   1. moefy: split by three domains, pre-gating router, layer-wise gates, 100 steps of expert
#      fine-tuning and of the pruned baseline (~40 min on 2 cores);
#   2. speed: the dense model against the MoE and against the pruned model (bench/moe/speed.sh);
#   3. MMLU 5-shot on the val split, 5 questions per subject: dense, MoE, pruned.
#
#   bench/moe/study.sh [OUT]      # default out/readme-study; results under bench/results/moe/
set -euo pipefail
OUT="${1:-out/readme-study}"
BIN="${RECOMPOSE:-target/release/recompose}"
RES=bench/results/moe
mkdir -p "$RES"
"$BIN" moefy --calib shakespeare,austen,mmlu --finetune-steps 100 -o "$OUT" | tee "$RES/moefy.txt"
cp "$OUT/report.json" "$RES/smollm2-report.json"
cp "$OUT/finetune-moe.log.jsonl" "$OUT/finetune-pruned.log.jsonl" "$RES/"
bench/moe/speed.sh "$OUT" "$RES/speed-moe.json" | tee "$RES/speed-moe.md"
bench/moe/speed.sh "$OUT/pruned" "$RES/speed-pruned.json" | tee "$RES/speed-pruned.md"
for m in dense moe pruned; do
    case $m in dense) flag=() ;; moe) flag=(--moe "$OUT") ;; pruned) flag=(--moe "$OUT/pruned") ;; esac
    "$BIN" -q eval mmlu "${flag[@]}" --split val --limit 5 --shots 5 --json "$RES/mmlu-$m.json"
done
python3 bench/moe/mmlu_pairs.py "$RES"/mmlu-{dense,moe,pruned}.json | tee "$RES/mmlu.md"
