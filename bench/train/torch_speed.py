#!/usr/bin/env python3
"""Training speed of HF transformers + PEFT on PyTorch CPU, the peer of `recompose finetune`.

    torch_speed.py --model HF_DIR --mode lora|full --threads N --steps S [--checkpointing] --text FILE...

Same work as recompose's benchmark: smollm2-135m in f32 (the HF folder `recompose convert` wrote
from the GGUF), rows of 512 tokens packed from the given texts, batch 4, AdamW (lr 2e-4, PyTorch
defaults otherwise), LoRA r=16 alpha=32 on q/k/v/o (dropout 0) or every weight, SDPA attention,
train mode. Prints JSON: per-step seconds, the median tokens/s over steps 2.., peak RSS.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--mode", choices=["lora", "full"], required=True)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--ctx", type=int, default=512)
p.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing")
p.add_argument("--text", nargs="+", required=True)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model)
ids = []
for f in a.text:
    ids += tok(open(f, encoding="utf-8").read(), add_special_tokens=False).input_ids + [tok.eos_token_id]
rows = [ids[i * a.ctx:(i + 1) * a.ctx + 1] for i in range((len(ids) - 1) // a.ctx)]
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
if a.mode == "lora":
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
if a.checkpointing:
    model.gradient_checkpointing_enable()
    if a.mode == "lora":
        model.enable_input_require_grads()
model.train()
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
secs = []
for s in range(a.steps):
    batch = [rows[(s * a.batch + r) % len(rows)] for r in range(a.batch)]
    x = torch.tensor([b[:-1] for b in batch])
    y = torch.tensor([b[1:] for b in batch])
    t0 = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    secs.append(time.perf_counter() - t0)
tokens = a.batch * a.ctx
print(json.dumps({
    "peer": "transformers+peft" if a.mode == "lora" else "transformers",
    "mode": a.mode, "threads": a.threads, "checkpointing": a.checkpointing,
    "step_seconds": secs,
    "tokens_per_s": tokens / statistics.median(secs[1:] or secs),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch": torch.__version__,
}))
