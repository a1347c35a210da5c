#!/usr/bin/env bash
# The RWS study on CIFAR-10 (VGG, dense): one pretrained init; a clean fine-tune and one
# corruption-robust fine-tune per corruption; signatures from the first K layers; patch, sweep
# alpha, compose two, remove; sizes against a full copy.
#   bench/vision/rws_study.sh [target/release/recompose]
# Env: WORK (checkpoints; $RECOMPOSE_HOME/vision-rws), OUT (results), K (4), SEVERITY (3).
set -euo pipefail
R=${1:-target/release/recompose}
WORK=${WORK:-${RECOMPOSE_HOME:-$HOME/.cache/recompose}/vision-rws}
OUT=${OUT:-bench/results/vision/rws}
K=${K:-4}
SEV=${SEVERITY:-3}
CORRUPTIONS=${CORRUPTIONS:-"gaussian_noise gaussian_blur contrast"}
mkdir -p "$WORK" "$OUT"
W=$WORK
train() { local out=$1; shift; [ -f "$out" ] || "$R" vision train --data cifar10 "$@" --out "$out" 2>&1 | tee -a "$OUT/train.log"; }
ev() { "$R" vision eval "$1" --data cifar10 --json "$2" "${@:3}" > /dev/null; }

train "$W/pre.safetensors" --arch vgg --width 16 --method standard --epochs 8 --seed 0
train "$W/clean.safetensors" --init "$W/pre.safetensors" --method standard --epochs 3 --lr 0.01 --seed 1
for c in $CORRUPTIONS; do
  train "$W/robust-$c.safetensors" --init "$W/pre.safetensors" --method standard --epochs 3 --lr 0.01 --seed 1 --corruption "$c:$SEV"
done

for c in $CORRUPTIONS; do
  "$R" -q rws extract --pretrained "$W/pre.safetensors" --clean "$W/clean.safetensors" --robust "$W/robust-$c.safetensors" \
    --layers "first:$K" --levels 16 -o "$W/sig-$c.safetensors" 2>&1 | tee -a "$OUT/sizes.txt"
  for m in clean robust-$c; do
    ev "$W/$m.safetensors" "$OUT/eval-$m-on-$c.json" --corruption "$c:$SEV"
    ev "$W/$m.safetensors" "$OUT/eval-$m-on-clean.json"
  done
  rm -f "$W/patched-$c.safetensors"
  "$R" -q rws apply "$W/clean.safetensors" "$W/sig-$c.safetensors:1.0" -o "$W/patched-$c.safetensors"
  ev "$W/patched-$c.safetensors" "$OUT/eval-patched-$c-on-$c.json" --corruption "$c:$SEV"
  ev "$W/patched-$c.safetensors" "$OUT/eval-patched-$c-on-clean.json"
  ev "$W/patched-$c.safetensors" "$OUT/eval-patched-bn-$c-on-$c.json" --corruption "$c:$SEV" --recalibrate-bn 20
  ev "$W/patched-$c.safetensors" "$OUT/eval-patched-bn-$c-on-clean.json" --recalibrate-bn 20
done

# Alpha sweep for the first corruption.
set -- $CORRUPTIONS; c1=$1; c2=$2
for a in 0 0.25 0.5 0.75 1.0 1.25 1.5; do
  rm -f "$W/alpha.safetensors"
  "$R" -q rws apply "$W/clean.safetensors" "$W/sig-$c1.safetensors:$a" -o "$W/alpha.safetensors"
  ev "$W/alpha.safetensors" "$OUT/alpha-$a-on-$c1.json" --corruption "$c1:$SEV"
  ev "$W/alpha.safetensors" "$OUT/alpha-$a-on-clean.json"
done

# Two signatures composed.
rm -f "$W/composed.safetensors" "$W/removed.safetensors"
"$R" -q rws apply "$W/clean.safetensors" "$W/sig-$c1.safetensors:1.0" "$W/sig-$c2.safetensors:1.0" -o "$W/composed.safetensors"
for c in $c1 $c2; do ev "$W/composed.safetensors" "$OUT/composed-on-$c.json" --corruption "$c:$SEV"; done
ev "$W/composed.safetensors" "$OUT/composed-on-clean.json"
# Removal: take both back out and compare with the clean model tensor by tensor.
"$R" -q rws remove "$W/composed.safetensors" "$W/sig-$c1.safetensors:1.0" "$W/sig-$c2.safetensors:1.0" -o "$W/removed.safetensors"
python3 bench/vision/summarize.py compare "$W/clean.safetensors" "$W/removed.safetensors" | tee "$OUT/removal.txt"

# Signature size against K and levels (extraction only).
: > "$OUT/size-sweep.txt"
for k in 2 4 6 8 13; do
  for lv in 16 256 f32; do
    lvl=(--levels "$lv"); [ "$lv" = f32 ] && lvl=()
    "$R" -q rws extract --pretrained "$W/pre.safetensors" --clean "$W/clean.safetensors" --robust "$W/robust-$c1.safetensors" \
      --layers "first:$k" "${lvl[@]}" -o "$W/size.safetensors" > /dev/null 2>&1 || { "$R" -q rws extract --pretrained "$W/pre.safetensors" --clean "$W/clean.safetensors" --robust "$W/robust-$c1.safetensors" --layers "first:$k" "${lvl[@]}" -o "$W/size.safetensors"; exit 1; }
    echo "K=$k levels=$lv bytes=$(stat -c %s "$W/size.safetensors") full=$(stat -c %s "$W/clean.safetensors")" >> "$OUT/size-sweep.txt"
    rm -f "$W/size.safetensors"
    rm -f "$W/k.safetensors"
  done
  # Accuracy of a first:k, 16-level patch on the first corruption.
  "$R" -q rws extract --pretrained "$W/pre.safetensors" --clean "$W/clean.safetensors" --robust "$W/robust-$c1.safetensors" \
    --layers "first:$k" --levels 16 -o "$W/k.safetensors" > /dev/null
  rm -f "$W/kp.safetensors"
  "$R" -q rws apply "$W/clean.safetensors" "$W/k.safetensors:1.0" -o "$W/kp.safetensors"
  ev "$W/kp.safetensors" "$OUT/k$k-on-$c1.json" --corruption "$c1:$SEV"
  ev "$W/kp.safetensors" "$OUT/k$k-on-clean.json"
  rm -f "$W/k.safetensors" "$W/kp.safetensors"
done
python3 bench/vision/summarize.py rws "$OUT" $CORRUPTIONS
