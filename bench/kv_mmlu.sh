#!/usr/bin/env bash
# MMLU 5-shot with the budget applied while the prompt is read (the H2O paper's lm-eval
# setting: prefill in steps of 16 tokens, evicting after each), 10 subjects x 20 test questions.
# One JSON per policy under bench/results/kv/mmlu/ (with every pick, for paired comparison).
#
#   bench/kv_mmlu.sh smollm2-135m
set -euo pipefail
model=${1:-smollm2-135m}
bin=${RECOMPOSE_BIN:-target/release/recompose}
out=bench/results/kv/mmlu
subjects=high_school_geography,marketing,nutrition,astronomy,high_school_psychology,miscellaneous,sociology,world_religions,high_school_government_and_politics,management
mkdir -p "$out"
for spec in full "h2o:0.2,prefill=16" "window:0.2,prefill=16" "window:0.2,sinks=4,prefill=16"; do
  file="$out/${model}_${spec//[:,=]/_}.json"
  if [[ -s "$file" ]]; then echo "skip $spec"; continue; fi
  echo "== $model $spec"
  "$bin" -q ${THREADS:+--threads $THREADS} eval mmlu -m "$model" --split test --subjects "$subjects" --limit 20 --kv "$spec" --json "$file" | tail -1
done
