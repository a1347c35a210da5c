#!/usr/bin/env python3
"""Cross-check the transformers logits fixtures against llama.cpp on the same float32 weights.

For each model: dequantise the GGUF to an all-F32 GGUF (bench/dequant_gguf.py, cached under
$RECOMPOSE_HOME/peers-f32/), run llama.cpp on it with an F32 KV cache (its default is F16), and
report the largest |llama.cpp - transformers| over every logit stored in logits_<model>.json (top-20
and the 64 sampled ids, every recorded position, the long prompt included). Also reports how far
llama.cpp on the quantised GGUF is from the float32 fixture (its top-5 at each prompt position).

    "$(bench/setup_peers.sh --print-venv)"/bin/python bench/check_fixtures.py

Measured here (llama-cpp-python 0.3.36, transformers 5.24.0): smollm2-135m f32 max diff 6e-5;
gemma3-270m f32 max diff 1.4e-2 (llama.cpp's CPU GELU goes through an f16 lookup table);
quantised vs f32: up to 0.72 (smollm2 Q4_1) and 1.14 (gemma3 Q4_K_M), argmax equal everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
FIXTURES = BENCH.parent / "crates" / "recompose-llm" / "tests" / "fixtures"
HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))
MODELS = {
    "smollm2-135m": HOME / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": HOME / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf",
}
GGML_TYPE_F32 = 0


def main() -> None:
    import llama_cpp

    report = {}
    for name, src in MODELS.items():
        fix = FIXTURES / f"logits_{name}.json"
        if not fix.is_file() or not src.is_file():
            print(f"skip {name}: missing {fix if not fix.is_file() else src}", file=sys.stderr)
            continue
        f32 = HOME / "peers-f32" / (src.stem + ".f32.gguf")
        if not f32.is_file():
            f32.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(BENCH / "dequant_gguf.py"), str(src), str(f32)], check=True)
        L = json.loads(fix.read_text())
        sample = np.array(L["sample_ids"])
        llm = llama_cpp.Llama(model_path=str(f32), n_ctx=1024, n_batch=1024, logits_all=True, n_threads=2,
                              n_threads_batch=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
        nv = llm.n_vocab()
        per_prompt = []
        for p in L["prompts"] + [L["long_prompt"]]:
            llm.reset()
            llm.eval(p["ids"])
            sc = np.asarray(llm.scores[: llm.n_tokens, :nv])
            worst = 0.0
            for rec in p["positions"]:
                row = sc[rec["pos"]]
                worst = max(worst, max(abs(float(row[i]) - v) for i, v in rec["top"]),
                            float(np.abs(row[sample] - np.array(rec["sample"])).max()))
            per_prompt.append({"prompt": p.get("text", "long_prompt"), "n_ids": len(p["ids"]), "max_abs_diff": worst})
        del llm
        out = {"f32_llamacpp_vs_hf": per_prompt}
        g = FIXTURES / f"llamacpp_greedy_{name}.json"
        if g.is_file():
            G = json.loads(g.read_text())
            worst, same = 0.0, 0
            total = 0
            for lp, gp in zip(L["prompts"], G["prompts"]):
                for a, b in zip(lp["positions"], gp["prompt_top"]):
                    hf = {int(i): v for i, v in a["top"]}
                    worst = max([worst] + [abs(hf[i] - v) for i, v in b["top"] if i in hf])
                    same += a["top"][0][0] == b["top"][0][0]
                    total += 1
            out["quantised_llamacpp_vs_hf_f32"] = {"max_abs_diff_top5": worst, "argmax_equal": f"{same}/{total}"}
        report[name] = out
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
