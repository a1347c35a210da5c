#!/usr/bin/env bash
# The AdvMoE table: dense + PGD-AT, MoE + vanilla PGD-AT (router and experts jointly) and
# MoE + AdvMoE, same epochs and data for every row, on CIFAR-10 and Fashion-MNIST, per seed.
# Each run resumes where it stopped, so the script can be re-run after an interruption.
#   bench/vision/advmoe_table.sh [target/release/recompose]
# Env: EPOCHS (3), SEEDS ("0 1"), DATASETS ("cifar10 fashion-mnist"), PER_CLASS (800),
#      ROWS ("dense-at moe-at moe-advmoe"; moe-trades is the ablation: TRADES, trained jointly),
#      WIDTH (16), ARCH (vgg), WORK (checkpoints; $RECOMPOSE_HOME/vision-table-${EPOCHS}ep, per
#      budget, so a longer run never resumes a shorter one's schedule), OUT (results).
set -euo pipefail
R=${1:-target/release/recompose}
EPOCHS=${EPOCHS:-3}
SEEDS=${SEEDS:-"0 1"}
DATASETS=${DATASETS:-"cifar10 fashion-mnist"}
PER_CLASS=${PER_CLASS:-800}
WIDTH=${WIDTH:-16}
ARCH=${ARCH:-vgg}
ROWS=${ROWS:-"dense-at moe-at moe-advmoe"}
WORK=${WORK:-${RECOMPOSE_HOME:-$HOME/.cache/recompose}/vision-table-${EPOCHS}ep}
OUT=${OUT:-bench/results/vision/table}
mkdir -p "$WORK" "$OUT"
# Seeds outermost: a cut-short run still has every data set at the first seed.
for seed in $SEEDS; do
  for data in $DATASETS; do
    for row in $ROWS; do
      case $row in
        dense-at) args=(--experts 1 --method pgd-at) ;;
        moe-at) args=(--experts 2 --method pgd-at) ;;
        moe-advmoe) args=(--experts 2 --method advmoe) ;;
        moe-trades) args=(--experts 2 --method trades) ;;
        *) echo "unknown row $row" >&2; exit 2 ;;
      esac
      name=$data-$ARCH$WIDTH-$row-s$seed
      ckpt=$WORK/$name.safetensors
      # Done, or stopped by the trainer (e.g. routing collapse): a result either way, not redone.
      [ -f "$OUT/$name.json" ] && continue
      grep -qs "^$name " "$OUT/failed.txt" && continue
      resume=(); [ -f "$ckpt" ] && resume=(--resume)
      start=$(date +%s)
      if ! "$R" vision train --data "$data" --arch "$ARCH" --width "$WIDTH" "${args[@]}" --epochs "$EPOCHS" \
        --per-class "$PER_CLASS" --seed "$seed" --out "$ckpt" "${resume[@]}" 2>&1 | tee -a "$OUT/$name.log"; then
        echo "$name $(grep '^error: ' "$OUT/$name.log" | tail -1)" >> "$OUT/failed.txt"
        continue
      fi
      secs=$(( $(date +%s) - start ))
      [ -n "${resume[*]}" ] || echo "$name train_seconds $secs" >> "$OUT/times.txt"
      "$R" vision eval "$ckpt" --data "$data" --attack pgd10 --limit 2000 --json "$OUT/$name.json" | tee -a "$OUT/$name.log"
      cp "$WORK/$name.log.jsonl" "$OUT/$name.epochs.jsonl"
    done
  done
done
python3 bench/vision/summarize.py table "$OUT"
