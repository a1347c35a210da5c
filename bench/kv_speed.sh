#!/usr/bin/env bash
# Decode speed and KV memory against context length, full vs bounded caches at the same budget,
# on an otherwise idle machine. Writes bench/results/kv/speed/<model>.json (bench/plot_kv.py
# prints the table), then measures h2o's overhead over window at equal budget with repeats.
#
#   bench/kv_speed.sh gemma3-270m 1024,2048,4096,8192,16384
set -euo pipefail
model=${1:-gemma3-270m}
contexts=${2:-1024,2048,4096,8192,16384}
bin=${RECOMPOSE_BIN:-target/release/recompose}
out=bench/results/kv/speed
mkdir -p "$out"
"$bin" bench -m "$model" --data austen/emma.txt --prompt-tokens "$contexts" --gen-tokens 64 --runs 1 \
  --kv full --kv h2o:256 --kv window:256,sinks=4 --json "$out/$model.json"
# Overhead of h2o over window at equal budget: short prompt, long decode, interleaved repeats.
"$bin" bench -m "$model" --data austen/emma.txt --prompt-tokens 1024 --gen-tokens 256 --runs 3 \
  --kv h2o:256 --kv window:256,sinks=4 --kv h2o:256 --kv window:256,sinks=4 --json "$out/${model}_overhead.json"
