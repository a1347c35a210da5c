#!/usr/bin/env bash
# Long-text perplexity of every KV policy and budget: one Austen novel streamed token by token
# (--chunk 1; gemma3 defaults to --chunk 16, see docs/KV.md) through each policy. Writes one
# JSON per run under bench/results/kv/ppl/; bench/plot_kv.py draws the figure and the table.
#
#   bench/kv_quality.sh smollm2-135m 8192        # model, tokens [, chunk]
#   BUDGETS="64 256 0.2" bench/kv_quality.sh gemma3-270m 16384 16
set -euo pipefail
model=${1:-smollm2-135m}
tokens=${2:-8192}
chunk=${3:-1}
text=${KV_TEXT:-austen/emma.txt}
bin=${RECOMPOSE_BIN:-target/release/recompose}
out=bench/results/kv/ppl
mkdir -p "$out"
specs=(full)
for b in ${BUDGETS:-64 128 256 512 0.1 0.2 0.5}; do
  specs+=("window:$b" "window:$b,sinks=4" "h2o:$b")
done
# SPECS="h2o:256 window:64" runs just those (two runs of this script can share the work).
if [[ -n "${SPECS:-}" ]]; then read -ra specs <<< "$SPECS"; fi
for spec in "${specs[@]}"; do
  file="$out/${model}_${spec//[:,=]/_}.json"
  if [[ -s "$file" ]]; then echo "skip $spec (have $file)"; continue; fi
  mkdir "$file.lock" 2>/dev/null || { echo "skip $spec (another run has it)"; continue; }
  echo "== $model $spec"
  "$bin" -q ${THREADS:+--threads $THREADS} eval ppl -m "$model" --data "$text" --tokens "$tokens" --chunk "$chunk" --stream --kv "$spec" --json "$file"
  rmdir "$file.lock"
done
