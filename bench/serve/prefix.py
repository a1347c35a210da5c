#!/usr/bin/env python3
"""Prefix caching in `recompose serve`: time to first token with a shared system prompt cached
vs not, identical greedy outputs, and memory under a load of distinct prefixes.

    python bench/serve/prefix.py [--bin target/release/recompose] [--model smollm2-135m] \
        [--system-tokens 1000] [--requests 10] [--threads 2] [--json OUT]

1. TTFT: two fresh servers, `--no-prefix-cache` and `--prefix-cache 256`. Each gets
   one warm-up request, then --requests requests one at a time (no other load), each the same
   ~--system-tokens system text (Pride and Prejudice prose) followed by a different question,
   greedy, 32 tokens, streamed. Reported: median and p95 TTFT per server, their ratio, the
   cached prompt tokens the server reported (usage.prompt_tokens_details.cached_tokens), and
   whether every output is identical between the two servers.
2. Memory: a server with `--prefix-cache 64` gets --distinct requests whose prompts are all
   different ~--system-tokens texts. After each it reads recompose_prefix_cache_bytes from
   /metrics and the server's RSS: the cache must never exceed its 64 MiB budget and RSS must
   level off.
Run with the serve venv's python (bench/serve/setup_serve_peers.sh --print-venv).
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import httpx

HOME = os.environ.get("RECOMPOSE_HOME", os.path.expanduser("~/.cache/recompose"))
TEXT = f"{HOME}/austen/texts/prideprejudice.txt"


def words():
    if not os.path.exists(TEXT):
        sys.exit(f"{TEXT} is missing: run `recompose fetch austen` first")
    w = open(TEXT, encoding="utf-8", errors="replace").read().split()
    return w[len(w) // 10:]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, binary, model, threads, flags):
        self.port = free_port()
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([binary, "serve", "--model", model, "--port", str(self.port), *flags],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        sys.exit("the server did not come up")

    def rss_mib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metric(self, name):
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def complete(url, model, prompt, max_tokens=32):
    """One greedy streamed completion: (ttft seconds, text, usage)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, "", {}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            usage = ev.get("usage") or usage
            piece = "".join(c.get("text") or "" for c in ev.get("choices") or [])
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
    return (ttft if ttft is not None else time.perf_counter() - t0), text, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/recompose")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--distinct", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    w = words()
    nw = round(0.75 * a.system_tokens)
    system = " ".join(w[:nw]) + "\n\n"
    questions = [" ".join(w[nw + 50 * i: nw + 50 * i + 12]) for i in range(a.requests + 1)]

    result = {"system_tokens_requested": a.system_tokens, "requests": a.requests, "threads": a.threads}
    outputs = {}
    for label, flags in [("no-cache", ["--no-prefix-cache"]), ("cache", ["--prefix-cache", "256"])]:
        s = Server(a.bin, a.model, a.threads, flags)
        try:
            complete(s.url, a.model, system + questions[0])  # warm-up (fills the cache)
            runs = [complete(s.url, a.model, system + q) for q in questions[1:]]
        finally:
            s.close()
        ttfts = sorted(r[0] for r in runs)
        outputs[label] = [r[1] for r in runs]
        result[label] = {
            "ttft_median_ms": 1e3 * statistics.median(ttfts),
            "ttft_p95_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "prompt_tokens": runs[0][2].get("prompt_tokens"),
            "cached_tokens": [r[2].get("prompt_tokens_details", {}).get("cached_tokens") for r in runs],
        }
        print(f"{label}: TTFT median {result[label]['ttft_median_ms']:.0f} ms, p95 {result[label]['ttft_p95_ms']:.0f} ms, "
              f"{result[label]['prompt_tokens']} prompt tokens, cached {result[label]['cached_tokens']}", flush=True)
    result["ttft_ratio_median"] = result["no-cache"]["ttft_median_ms"] / result["cache"]["ttft_median_ms"]
    result["outputs_identical"] = outputs["no-cache"] == outputs["cache"]
    # Per request: where the two texts part (None: identical), to tell a near-tie late in a
    # continuation from a wrong cache.
    result["first_difference_at_char"] = [
        None if x == y else next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        for x, y in zip(outputs["no-cache"], outputs["cache"])]
    result["outputs"] = outputs
    print(f"TTFT without / with the cache: {result['ttft_ratio_median']:.1f}x; outputs identical: "
          f"{result['outputs_identical']} (first difference per request, in characters: "
          f"{result['first_difference_at_char']})", flush=True)

    budget = 64
    s = Server(a.bin, a.model, a.threads, ["--prefix-cache", str(budget)])
    trace = []
    try:
        for i in range(a.distinct):
            start = (i * 997) % (len(w) - nw - 20)
            complete(s.url, a.model, " ".join(w[start:start + nw]), max_tokens=4)
            trace.append({"request": i + 1, "prefix_cache_mib": s.metric("recompose_prefix_cache_bytes") / 2**20,
                          "rss_mib": s.rss_mib()})
    finally:
        s.close()
    result["distinct"] = {"budget_mib": budget, "trace": trace,
                          "max_prefix_cache_mib": max(t["prefix_cache_mib"] for t in trace),
                          "rss_first_mib": trace[0]["rss_mib"], "rss_last_mib": trace[-1]["rss_mib"],
                          "rss_max_mib": max(t["rss_mib"] for t in trace)}
    d = result["distinct"]
    print(f"{a.distinct} distinct prefixes, --prefix-cache {budget}: cache at most {d['max_prefix_cache_mib']:.1f} MiB; "
          f"RSS {d['rss_first_mib']:.0f} MiB after the first, {d['rss_last_mib']:.0f} after the last, "
          f"max {d['rss_max_mib']:.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
