#!/usr/bin/env python3
"""Build the tiny Llama-shaped HF models that bench/merge/parity.py merges.

    "$(bench/merge/setup_mergekit.sh --print-venv)"/bin/python bench/merge/make_models.py OUTDIR

Writes OUTDIR/{base,ft1,ft2,ft3,ft_vocab}/ with config.json, model.safetensors (float32, HF tensor
names, untied lm_head) and a BPE tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json). Everything comes from fixed seeds, so reruns give identical bytes.

  base      random init (std 0.02 matrices, norms around 1), vocab 512
  ft1       base + dense gaussian delta (std 2e-3)
  ft2       base - 0.7 * delta(ft1) + dense gaussian (std 1e-3): mostly opposite signs to ft1,
            so TIES sign election matters
  ft3       base + sparse delta: 10% of the elements, std 5e-3, random signs
  ft_vocab  different tokenizer: base's vocab minus 12 merged tokens, ids shuffled (specials stay
            0..2), plus 16 new BPE merges and 4 new special added tokens -> vocab 520. Its
            embed_tokens / lm_head rows are base's (+ a dense delta, std 2e-3) permuted to its ids,
            new tokens get fresh random rows; the other tensors are base + the same kind of delta.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 64, 128, 4, 4, 2, 16
SPECIALS = ["<unk>", "<s>", "</s>"]
NEW_SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool>", "</tool>"]


WORDS = """the of and to in is that it was for on are as with his they at be this from have or by
one had not but what all were when we there can an your which their said if do will each about how up
out them then she many some so these would other into has more her two like him see time could no make
than first been its who now people my made over did down only way find use may water long little very
after words called just where most know get through back much before go good new write our used me man
too any day same right look think also around another came come work three word must because does part
even place well such here take why things help put years different away again off went old number great
tell men say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always looked
show large often together asked house world going want school important until form food keep children""".split()


def make_bpe(n_vocab: int, seed: int):
    """A valid BPE (Metaspace pre-tokenizer, like Llama's): specials, single characters, then the
    prefix merges spelling WORDS ("\u2581t"+"h", "\u2581th"+"e", ...), then merges of existing
    tokens picked by a seeded RNG until the vocab has n_vocab entries."""
    rng = np.random.default_rng(seed)
    chars = ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    chars += list("0123456789.,!?'-")
    vocab = SPECIALS + chars
    merges, seen = [], set(vocab)

    def add(left, right):
        if left + right not in seen and len(vocab) < n_vocab:
            seen.add(left + right)
            vocab.append(left + right)
            merges.append((left, right))

    for w in WORDS:
        w = "\u2581" + w
        for i in range(2, len(w) + 1):
            add(w[: i - 1], w[i - 1])
    while len(vocab) < n_vocab:
        left, right = (vocab[3 + int(rng.integers(len(vocab) - 3))] for _ in range(2))
        if "\u2581" not in right and len(left + right) <= 8:
            add(left, right)
    return vocab, merges


def save_tokenizer(path: str, vocab: list[str], merges: list, added_specials: list[str]) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    # specials are already in the vocab; registering them marks them as special added tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + added_specials])
    tok.save(os.path.join(path, "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                   "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                   **specials}, f, indent=2)


def save_model(path: str, tensors: dict, vocab_size: int) -> None:
    os.makedirs(path, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def base_tensors(rng) -> dict:
    def mat(rows, cols):
        return rng.normal(0.0, 0.02, (rows, cols))

    def norm():
        return 1.0 + rng.normal(0.0, 0.1, (HIDDEN,))

    t = {"model.embed_tokens.weight": mat(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = mat(HIDDEN, HEADS * HEAD_DIM)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "mlp.gate_proj.weight"] = mat(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = mat(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = mat(HIDDEN, INTER)
    t["model.norm.weight"] = norm()
    t["lm_head.weight"] = mat(VOCAB, HIDDEN)
    return {k: v.astype(np.float32) for k, v in t.items()}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_models.py OUTDIR")
    out = sys.argv[1]
    rng = np.random.default_rng(20240601)
    base = base_tensors(rng)
    vocab, merges = make_bpe(VOCAB, seed=7)

    d1 = {k: rng.normal(0, 2e-3, v.shape) for k, v in base.items()}
    d2 = {k: -0.7 * d1[k] + rng.normal(0, 1e-3, v.shape) for k, v in base.items()}
    d3 = {k: rng.normal(0, 5e-3, v.shape) * (rng.random(v.shape) < 0.1) for k, v in base.items()}
    for name, delta in [("base", None), ("ft1", d1), ("ft2", d2), ("ft3", d3)]:
        path = os.path.join(out, name)
        t = base if delta is None else {k: (base[k] + delta[k]).astype(np.float32) for k in base}
        save_model(path, t, VOCAB)
        save_tokenizer(path, vocab, merges, [])

    # ft_vocab: drop 12 merged tokens that no merge uses (leaves), shuffle ids, add new tokens
    base_id = {t: i for i, t in enumerate(vocab)}
    used = {x for m in merges for x in m}
    leaves = [t for t in vocab[3 + 69:] if t not in used]
    dropped = set(rng.choice(leaves, 12, replace=False).tolist())
    kept = [t for t in vocab[3:] if t not in dropped]
    kept_merges = [m for m in merges if m[0] + m[1] not in dropped]
    # new merges: an existing word token + a lowercase letter ("\u2581the" + "q" -> "\u2581theq")
    words = [t for t in kept if t.startswith("\u2581") and len(t) >= 3]
    new_merges, new_toks = [], set()
    while len(new_merges) < 16:
        a, b = words[int(rng.integers(len(words)))], chr(ord("a") + int(rng.integers(26)))
        if a + b not in base_id and a + b not in new_toks:
            new_toks.add(a + b)
            new_merges.append((a, b))
    body = kept + [a + b for a, b in new_merges]
    order = rng.permutation(len(body))
    v2 = SPECIALS + [body[i] for i in order] + NEW_SPECIALS
    dv = {k: rng.normal(0, 2e-3, v.shape) for k, v in base.items()}
    t2 = {k: (base[k] + dv[k]).astype(np.float32) for k in base}
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:
        rows = np.empty((len(v2), HIDDEN), dtype=np.float32)
        for i, tok in enumerate(v2):
            rows[i] = t2[name][base_id[tok]] if tok in base_id else rng.normal(0, 0.02, HIDDEN)
        t2[name] = rows
    path = os.path.join(out, "ft_vocab")
    save_model(path, t2, len(v2))
    save_tokenizer(path, v2[:-len(NEW_SPECIALS)], kept_merges + new_merges, NEW_SPECIALS)
    print(f"wrote base, ft1, ft2, ft3, ft_vocab (vocab {len(v2)}) under {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
