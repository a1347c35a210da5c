#!/usr/bin/env bash
# Speed and peak memory of `recompose merge` vs mergekit on a real model (SmolLM2-135M, float32).
#
#   bench/merge/speed.sh [RECOMPOSE_BIN] [--runs N] [--mergekit-only] [--json PATH]
#
# RECOMPOSE_BIN defaults to target/release/recompose; the JSON to bench/results/merge/speed.json.
# Inputs are cached under ${RECOMPOSE_HOME:-~/.cache/recompose}/merge-bench:
#   base/  the smollm2-135m GGUF (the *.gguf under $RECOMPOSE_HOME/smollm2-135m) dequantised by
#          transformers (from_pretrained(gguf_file=..., dtype=float32)), written as HF safetensors
#          (tied embeddings: no lm_head.weight), config.json and tokenizer
#   pa/ pb/  base + gaussian noise, std 1e-3 * std(tensor), numpy seeds 1 and 2
# Cases (dtype float32): ties (base_model base; pa, pb density 0.5 weight 0.5) and slerp (pa -> pb,
# t 0.5). Each tool runs N times per case (default 3), alternating, under /usr/bin/time -v (wall
# time, max RSS); the table shows medians, mergekit/recompose wall time and recompose/mergekit
# peak RSS. Both tools get every core: OMP/MKL/RAYON_NUM_THREADS=$(nproc), mergekit -j $(nproc).
# Extra recompose flags can be given in RECOMPOSE_MERGE_ARGS (e.g. "--threads 2").
# Needs bench/merge/setup_mergekit.sh first. Page cache is warmed before timing.
set -euo pipefail
cd "$(dirname "$0")/../.."

RECOMPOSE="target/release/recompose"; RUNS=3; MK_ONLY=0; JSON="bench/results/merge/speed.json"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --mergekit-only) MK_ONLY=1; shift ;;
        --json) JSON="$2"; shift 2 ;;
        *) RECOMPOSE="$1"; shift ;;
    esac
done
RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
BENCH="$RECOMPOSE_HOME/merge-bench"
VENV="$(bench/merge/setup_mergekit.sh --print-venv)"
PY="$VENV/bin/python"
THREADS="$(nproc)"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS"
[[ -x "$PY" ]] || { echo "run bench/merge/setup_mergekit.sh first" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "needs /usr/bin/time (GNU time, package 'time')" >&2; exit 1; }
if [[ $MK_ONLY == 0 && ! -x "$RECOMPOSE" ]]; then
    echo "no recompose binary at $RECOMPOSE (use --mergekit-only to time mergekit alone)" >&2; exit 1
fi

# 1. inputs (idempotent)
mkdir -p "$BENCH"
"$PY" - "$RECOMPOSE_HOME" "$BENCH" <<'PYEOF'
import glob, os, shutil, sys
import numpy as np
home, bench = sys.argv[1:]
if not os.path.exists(f"{bench}/base/config.json"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = sorted(glob.glob(f"{home}/smollm2-135m/*.gguf"))[0]
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    print(f"dequantising {gguf}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: write config and weights ourselves
    cfg = model.config
    cfg.architectures = ["LlamaForCausalLM"]  # absent after a GGUF load; mergekit needs it
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(f"{bench}/base.tmp")
    sd = {k: v.numpy() for k, v in model.state_dict().items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    from safetensors.numpy import save_file
    save_file(sd, f"{bench}/base.tmp/model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(f"{bench}/base.tmp")
    os.replace(f"{bench}/base.tmp", f"{bench}/base")
from safetensors.numpy import load_file, save_file
for name, seed in (("pa", 1), ("pb", 2)):
    if os.path.exists(f"{bench}/{name}/model.safetensors"):
        continue
    rng = np.random.default_rng(seed)
    t = load_file(f"{bench}/base/model.safetensors")
    out = {k: (v + rng.normal(0, 1e-3 * float(v.std()), v.shape)).astype(np.float32) for k, v in sorted(t.items())}
    shutil.copytree(f"{bench}/base", f"{bench}/{name}.tmp", ignore=shutil.ignore_patterns("model*.safetensors*"))
    save_file(out, f"{bench}/{name}.tmp/model.safetensors", metadata={"format": "pt"})
    os.replace(f"{bench}/{name}.tmp", f"{bench}/{name}")
PYEOF
cat > "$BENCH/ties.yml" <<EOF
merge_method: ties
base_model: $BENCH/base
models:
  - model: $BENCH/pa
    parameters: {density: 0.5, weight: 0.5}
  - model: $BENCH/pb
    parameters: {density: 0.5, weight: 0.5}
dtype: float32
out_dtype: float32
EOF
cat > "$BENCH/slerp.yml" <<EOF
merge_method: slerp
base_model: $BENCH/pa
models:
  - model: $BENCH/pa
  - model: $BENCH/pb
parameters: {t: 0.5}
dtype: float32
out_dtype: float32
EOF

# 2. timed runs: logs/<tool>-<case>-<i>.time hold /usr/bin/time -v's report
LOGS="$BENCH/logs"; rm -rf "$LOGS"; mkdir -p "$LOGS"
cat "$BENCH"/{base,pa,pb}/model.safetensors > /dev/null
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"   # recorded: other work on the CPUs skews timings
for case in ties slerp; do
    for i in $(seq 1 "$RUNS"); do
        tools="mergekit"; [[ $MK_ONLY == 0 ]] && tools="mergekit recompose"
        for tool in $tools; do
            out="$BENCH/out/$tool-$case"; rm -rf "$out"
            if [[ $tool == mergekit ]]; then
                cmd=("$VENV/bin/mergekit-yaml" "$BENCH/$case.yml" "$out" --random-seed 0 --quiet -j "$THREADS")
            else
                # shellcheck disable=SC2206
                cmd=("$RECOMPOSE" merge "$BENCH/$case.yml" "$out" --seed 0 --quiet ${RECOMPOSE_MERGE_ARGS:-})
            fi
            echo "$tool $case run $i: ${cmd[*]}" >&2
            /usr/bin/time -v -o "$LOGS/$tool-$case-$i.time" "${cmd[@]}" > "$LOGS/$tool-$case-$i.log" 2>&1 \
                || { echo "$tool failed, see $LOGS/$tool-$case-$i.log" >&2; exit 1; }
        done
    done
done

# 3. medians, ratios, JSON
mkdir -p "$(dirname "$JSON")"
"$PY" - "$LOGS" "$JSON" "$THREADS" "$RUNS" "$RECOMPOSE" "$MK_ONLY" "$LOAD_BEFORE" <<'PYEOF'
import glob, json, os, platform, re, statistics, sys
from importlib.metadata import version
logs, out, threads, runs, recompose, mk_only, load_before = sys.argv[1:]
def parse(path):
    text = open(path).read()
    h, m, s = ([0, 0] + re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1).split(":"))[-3:]
    return {"wall_s": int(h) * 3600 + int(m) * 60 + float(s),
            "peak_rss_mib": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024}
res = {}
for tool in ("mergekit", "recompose"):
    for case in ("ties", "slerp"):
        runs_ = [parse(p) for p in sorted(glob.glob(f"{logs}/{tool}-{case}-*.time"))]
        if runs_:
            res.setdefault(case, {})[tool] = {"runs": runs_, **{k: statistics.median(r[k] for r in runs_) for k in ("wall_s", "peak_rss_mib")}}
print(f"| case | mergekit wall s | recompose wall s | mergekit/recompose time | mergekit peak RSS MiB | recompose peak RSS MiB | recompose/mergekit RSS |")
print("|---|---|---|---|---|---|---|")
for case, r in res.items():
    mk, rc = r["mergekit"], r.get("recompose")
    r["time_ratio_mergekit_over_recompose"] = mk["wall_s"] / rc["wall_s"] if rc else None
    r["rss_ratio_recompose_over_mergekit"] = rc["peak_rss_mib"] / mk["peak_rss_mib"] if rc else None
    f = lambda x, fmt: "-" if x is None else format(x, fmt)
    print(f"| {case} | {mk['wall_s']:.2f} | {f(rc and rc['wall_s'], '.2f')} | {f(r['time_ratio_mergekit_over_recompose'], '.2f')} "
          f"| {mk['peak_rss_mib']:.0f} | {f(rc and rc['peak_rss_mib'], '.0f')} | {f(r['rss_ratio_recompose_over_mergekit'], '.2f')} |")
print(f"\nmedians of {runs} runs, {threads} threads each, SmolLM2-135M float32 (dequantised GGUF); load average before {load_before}")
json.dump({"model": "smollm2-135m (GGUF dequantised to float32 HF safetensors)", "threads": int(threads),
           "runs": int(runs), "mergekit_version": version("mergekit"), "torch_version": version("torch"),
           "recompose": None if mk_only == "1" else recompose, "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine()),
           "nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": open("/proc/loadavg").read().split()[:3],
           "cases": res}, open(out, "w"), indent=2)
print(f"wrote {out}", file=sys.stderr)
PYEOF
