#!/usr/bin/env bash
# The LoRA fine-tune of docs/TRAIN.md: smollm2-135m on eleven Shakespeare comedies, Twelfth Night
# held out. Trains, scores the held-out play (base vs adapter, the eval protocol of DESIGN.md:
# context 512, stride 256, every token), merges the adapter, converts it to Q8_0 GGUF, scores that
# with recompose and with llama.cpp, and plots the loss curve.
#
#   bench/train/shakespeare_lora.sh        # ~50 minutes on 2 cores; results in bench/results/train/
#   WORK=DIR RESUME=1 bench/train/shakespeare_lora.sh   # continue an interrupted run from its checkpoint
#
# Needs target/release/recompose and the peers venv (bench/setup_peers.sh) for llama.cpp and the plot.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/recompose}
RES=bench/results/train
WORK=${WORK:-$(mktemp -d)}
VENV=$(bench/setup_peers.sh --print-venv)
STEPS=${STEPS:-200}
mkdir -p "$RES"
S=shakespeare
COMEDIES=$S/as_you_like_it_gut.txt,$S/comedy_of_errors_gut.txt,$S/loves_labours_lost_gut.txt,$S/measure_for_measure_gut.txt,$S/merchant_of_venice_gut.txt,$S/merry_wives_of_windsor_gut.txt,$S/midsummer_nights_dream_gut.txt,$S/much_ado_about_nothing_gut.txt,$S/taming_of_the_shrew_gut.txt,$S/two_gentlemen_of_verona_gut.txt,$S/alls_well_that_ends_well_gut.txt
HELD=$S/twelfth_night_gut.txt
ADAPTER=$WORK/shakespeare-lora

"$BIN" finetune --data "$COMEDIES" --eval-data "$HELD" --lora r=16,alpha=32,targets=q,k,v,o \
    --steps "$STEPS" --lr 5e-4 --warmup 10 --min-lr-ratio 0.1 --batch 4 --ctx 512 \
    --eval-every 25 --eval-rows 16 --checkpoint-every 25 --no-recompute --seed 0 ${RESUME:+--resume} -o "$ADAPTER"
cp "$ADAPTER.log.jsonl" "$RES/shakespeare_lora.log.jsonl"
cp "$ADAPTER/adapter_config.json" "$RES/shakespeare_lora.adapter_config.json"

ppl() { "$BIN" eval ppl --data "$HELD" --tokens 0 --ctx 512 --stride 256 "$@"; }
ppl --f32 --json "$RES/ppl_base_f32.json"
ppl --f32 --lora "$ADAPTER" --json "$RES/ppl_lora_f32.json"
ppl --lora "$ADAPTER" --json "$RES/ppl_lora_q4_1_unmerged.json"

"$BIN" lora merge smollm2-135m "$ADAPTER" -o "$WORK/merged"
"$BIN" convert "$WORK/merged" "$WORK/merged-q8_0.gguf" --dtype q8_0
ppl -m "$WORK/merged-q8_0.gguf" --json "$RES/ppl_merged_q8_0_recompose.json"
"$VENV/bin/python" bench/train/llamacpp_check.py "$WORK/merged-q8_0.gguf" "$HELD" > "$RES/llamacpp_merged_q8_0.json"
"$VENV/bin/python" bench/train/plot_loss.py "$RES/shakespeare_lora.log.jsonl" docs/train_loss.png
echo "results in $RES (work files in $WORK)"
