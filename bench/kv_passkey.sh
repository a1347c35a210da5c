#!/usr/bin/env bash
# Passkey retrieval per KV policy: a key at depths 10/50/90% of Austen filler, prompts of
# 1k/2k/4k/8k tokens, fixed seed. One JSON per policy under bench/results/kv/passkey/.
#
#   bench/kv_passkey.sh smollm2-135m
#   SPECS=full DEPTHS=0.1,0.3,0.5,0.7,0.9 bench/kv_passkey.sh smollm2-135m   # the full cache's grid
set -euo pipefail
model=${1:-smollm2-135m}
bin=${RECOMPOSE_BIN:-target/release/recompose}
out=bench/results/kv/passkey
mkdir -p "$out"
for spec in ${SPECS:-full h2o:256,prefill=256 h2o:256 window:256,sinks=4}; do
  file="$out/${model}_${spec//[:,=]/_}.json"
  if [[ -s "$file" ]]; then echo "skip $spec"; continue; fi
  echo "== $model $spec"
  "$bin" -q ${THREADS:+--threads $THREADS} eval passkey -m "$model" --lengths 1024,2048,4096,8184 --depths "${DEPTHS:-0.1,0.5,0.9}" --trials 1 \
    --seed 1234 --kv "$spec" --json "$file" | tail -1
done
