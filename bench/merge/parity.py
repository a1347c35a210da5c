#!/usr/bin/env python3
"""Check `recompose merge` against mergekit on every config in bench/merge/configs/.

    VENV=$(bench/merge/setup_mergekit.sh --print-venv)
    $VENV/bin/python bench/merge/parity.py --recompose target/release/recompose --json parity.json
    $VENV/bin/python bench/merge/parity.py --self-test     # mergekit seed 0 vs mergekit seed 1

Models come from make_models.py (built into WORKDIR/models if missing). Each config's ${MODELS} is
replaced by that folder and the result written to WORKDIR/configs/. mergekit runs as
`mergekit-yaml CFG OUT --random-seed 0 --quiet` (CPU; its output is reused while the config text,
the models and the mergekit version are unchanged); recompose as `RECOMPOSE merge CFG OUT --seed 0
--quiet`. Outputs are compared tensor by tensor (names, shapes, dtypes):
  deterministic methods   max |diff| over all tensors <= 1e-6
  dare_*, della*          random masks differ between tools, so per-tool statistics of
                          delta = merged - base are compared instead, summed over tensors: fraction of
                          nonzero delta elements ("kept"), L1 and L2 of delta; pass if each is within
                          STOCH_TOL (relative) of mergekit's. Per tensor the worst relative L1 gap is
                          shown (tensors >= 4096 elements). For single-fine-tune configs also "expect":
                          kept vs density and L1(delta) / (weight * L1(ft - base)) (1 with l1 rescale).
Also compared: config.json keys in CONFIG_KEYS, and the tokenizer vocabulary (tokenizer.json with added
tokens). mergekit's union tokenizer numbers new tokens in hash order (it differs run to run), so if
both vocabularies hold the same tokens with other ids, vocabulary rows are aligned by token first.
Prints a markdown table, writes --json, exits 1 if any case does not pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
TOL = 1e-6
STOCH_TOL = 0.03
STOCHASTIC = {"dare_linear", "dare_ties", "della", "della_linear"}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CONFIG_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers",
               "tie_word_embeddings", "dtype")


def load_tensors(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def load_vocab(folder: Path):
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def config_subset(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("dtype", cfg.get("torch_dtype"))  # transformers 5 writes "dtype"
    return {k: cfg.get(k) for k in CONFIG_KEYS}


def run(cmd: list, log: Path) -> tuple[int, str]:
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n# rc={p.returncode} {time.time() - t0:.1f}s\n"
                   f"{p.stdout}\n{p.stderr}")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    err = next((line for line in lines if "Error" in line or "error" in line), lines[-1] if lines else "")
    return p.returncode, err.strip()


def delta_stats(merged: dict, base: dict) -> tuple[dict, dict]:
    """Per-tensor and summed (kept count, L1, L2^2, numel) of merged - base."""
    per, tot = {}, np.zeros(4)
    for k, m in merged.items():
        if k not in base or base[k].shape != m.shape:
            continue
        d = m.astype(np.float64) - base[k].astype(np.float64)
        s = np.array([np.count_nonzero(d), np.abs(d).sum(), (d * d).sum(), d.size])
        per[k], tot = s, tot + s
    return per, {"kept": tot[0] / tot[3], "l1": tot[1], "l2": float(np.sqrt(tot[2]))}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


def compare(case: str, method: str, cfg: dict, mk: Path, rc: Path, models: Path) -> dict:
    res = {"problems": []}
    prob = res["problems"]
    a, b = load_tensors(mk), load_tensors(rc)
    res["tensors"] = len(a)
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing:
        prob.append(f"missing {len(missing)}: {missing[:3]}")
    if extra:
        prob.append(f"extra {len(extra)}: {extra[:3]}")
    common = [k for k in a if k in b]
    for k in common:
        if a[k].shape != b[k].shape:
            prob.append(f"shape {k}: {a[k].shape} vs {b[k].shape}")
        elif a[k].dtype != b[k].dtype:
            prob.append(f"dtype {k}: {a[k].dtype} vs {b[k].dtype}")
    common = [k for k in common if a[k].shape == b[k].shape]

    ca, cb = config_subset(mk), config_subset(rc) if (rc / "config.json").exists() else {}
    diff_keys = [k for k in CONFIG_KEYS if ca.get(k) != cb.get(k)]
    if diff_keys:
        prob.append("config.json " + ", ".join(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in diff_keys))

    va, vb = load_vocab(mk), load_vocab(rc)
    if va is not None:
        if vb is None:
            prob.append("no tokenizer.json")
        elif set(va) != set(vb):
            prob.append(f"vocab: {len(set(va) - set(vb))} tokens missing, {len(set(vb) - set(va))} extra")
        elif va != vb:  # same tokens, other ids: align recompose's vocabulary rows to mergekit's ids
            moved = sum(va[t] != vb[t] for t in va)
            res["note"] = f"vocab ids differ for {moved} tokens, rows aligned by token"
            perm = np.empty(len(va), dtype=np.int64)
            for t, i in va.items():
                perm[i] = vb[t]
            for k in VOCAB_TENSORS:
                if k in b and b[k].shape[0] == len(va):
                    b[k] = b[k][perm]

    if method not in STOCHASTIC:
        diffs = {k: float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0
                 for k in common}
        worst = max(diffs, key=diffs.get) if diffs else None
        res["max_abs_diff"] = diffs[worst] if worst else None
        res["worst_tensor"] = worst
        res["summary"] = f"max abs diff {res['max_abs_diff']:.2e} ({worst})" if worst else "no tensors"
        if worst and diffs[worst] > TOL:
            n_bad = sum(d > TOL for d in diffs.values())
            prob.append(f"{n_bad} tensors above {TOL:g}")
        return res

    base = load_tensors(models / "base")
    pa, sa = delta_stats({k: a[k] for k in common}, base)
    pb, sb = delta_stats({k: b[k] for k in common}, base)
    res["mergekit"], res["recompose"] = sa, sb
    gaps = {k: rel(sa[k], sb[k]) for k in sa}
    res["rel_gap"] = gaps
    big = [k for k in pa if pa[k][3] >= 4096 and pa[k][1] > 0]
    res["worst_tensor_l1_gap"] = max((rel(pa[k][1], pb[k][1]) for k in big), default=0.0)
    res["summary"] = (f"kept {sa['kept']:.4f}/{sb['kept']:.4f} L1 {sa['l1']:.4g}/{sb['l1']:.4g} "
                      f"L2 {sa['l2']:.4g}/{sb['l2']:.4g} (mk/rc; worst tensor L1 gap "
                      f"{res['worst_tensor_l1_gap']:.1%})")
    bad = [k for k, g in gaps.items() if g > STOCH_TOL]
    if bad:
        prob.append("stats off by more than {:.0%}: {}".format(STOCH_TOL, ", ".join(
            f"{k} {gaps[k]:.1%}" for k in bad)))
    if len(cfg["models"]) == 1:  # single fine-tune: compare with what the config asks for
        p = cfg["models"][0]["parameters"]
        ft = load_tensors(models / Path(cfg["models"][0]["model"]).name)
        l1_ft = sum(np.abs(ft[k].astype(np.float64) - base[k]).sum() for k in common if k in ft)
        res["expect"] = {"density": p["density"], "kept": [sa["kept"], sb["kept"]],
                         "l1_ratio": [sa["l1"] / (p["weight"] * l1_ft), sb["l1"] / (p["weight"] * l1_ft)]}
        res["summary"] += (f"; expect kept~{p['density']}, L1 ratio "
                           f"{res['expect']['l1_ratio'][0]:.4f}/{res['expect']['l1_ratio'][1]:.4f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recompose", default="target/release/recompose")
    ap.add_argument("--workdir", default=os.path.join(
        os.environ.get("RECOMPOSE_HOME", os.path.expanduser("~/.cache/recompose")), "merge-parity"))
    ap.add_argument("--json")
    ap.add_argument("--cases", help="comma-separated config names (default: all)")
    ap.add_argument("--self-test", action="store_true",
                    help="use mergekit with --random-seed 1 in place of recompose")
    args = ap.parse_args()

    work = Path(args.workdir).resolve()
    models = work / "models"
    if not (models / "ft_vocab" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models)], check=True)
    mergekit = Path(sys.executable).parent / "mergekit-yaml"
    from importlib.metadata import version
    mk_version = version("mergekit")
    model_hash = hashlib.sha256(b"".join(
        (models / m / f).read_bytes() for m in sorted(os.listdir(models))
        for f in ("model.safetensors", "tokenizer.json"))).hexdigest()
    recompose = Path(args.recompose).resolve()
    have_rc = args.self_test or (recompose.is_file() and os.access(recompose, os.X_OK))

    names = sorted(p.stem for p in (HERE / "configs").glob("*.yml"))
    if args.cases:
        names = [n for n in names if n in args.cases.split(",")]
    (work / "configs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    results = []
    for name in names:
        text = (HERE / "configs" / f"{name}.yml").read_text().replace("${MODELS}", str(models))
        cfg_path = work / "configs" / f"{name}.yml"
        cfg_path.write_text(text)
        cfg = yaml.safe_load(text)
        row = {"case": name, "method": cfg["merge_method"]}
        results.append(row)

        mk_out, stamp = work / "mergekit" / name, f"{mk_version}\n{model_hash}\n{text}"
        if not (mk_out / ".parity-stamp").exists() or (mk_out / ".parity-stamp").read_text() != stamp:
            shutil.rmtree(mk_out, ignore_errors=True)
            code, err = run([mergekit, cfg_path, mk_out, "--random-seed", "0", "--quiet"],
                            work / "logs" / f"{name}.mergekit.log")
            if code != 0:
                row.update(status="mergekit failed", summary=err)
                continue
            (mk_out / ".parity-stamp").write_text(stamp)

        if not have_rc:
            row.update(status="recompose missing", summary=f"no executable at {recompose}")
            continue
        rc_out = work / ("selftest" if args.self_test else "recompose") / name
        shutil.rmtree(rc_out, ignore_errors=True)
        cmd = [mergekit, cfg_path, rc_out, "--random-seed", "1", "--quiet"] if args.self_test else \
            [recompose, "merge", cfg_path, rc_out, "--seed", "0", "--quiet"]
        code, err = run(cmd, work / "logs" / f"{name}.{'selftest' if args.self_test else 'recompose'}.log")
        if code != 0:
            row.update(status="recompose failed", summary=f"recompose failed: {err}")
            continue
        try:
            row.update(compare(name, cfg["merge_method"], cfg, mk_out, rc_out, models))
        except Exception as e:  # unreadable output etc.
            row.update(status="compare failed", summary=f"{type(e).__name__}: {e}")
            continue
        row["status"] = "FAIL" if row["problems"] else "pass"

    print("| case | method | tensors | max\\|diff\\| or stats (mergekit/recompose) | result |")
    print("|---|---|---|---|---|")
    for r in results:
        detail = r.get("summary", "")
        if r.get("problems"):
            detail += "; " + "; ".join(r["problems"])
        if r.get("note"):
            detail += f"; {r['note']}"
        print(f"| {r['case']} | {r['method']} | {r.get('tensors', '')} | {detail.replace('|', '/')} | {r['status']} |")
    n_pass = sum(r["status"] == "pass" for r in results)
    print(f"\n{n_pass}/{len(results)} pass (mergekit {mk_version}; second tool: "
          f"{'mergekit --random-seed 1 (self-test)' if args.self_test else recompose})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "mergekit_version": mk_version, "tolerance": TOL, "stochastic_tolerance": STOCH_TOL,
            "second_tool": "self-test" if args.self_test else str(recompose),
            "cases": results}, indent=2, default=float) + "\n")
    sys.exit(0 if n_pass == len(results) else 1)


if __name__ == "__main__":
    main()
