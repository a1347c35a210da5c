#!/usr/bin/env python3
"""Integration test of an OpenAI-compatible server through the official `openai` client.

    python openai_client.py BASE_URL MODEL [--expect-greedy FILE] [--skip NAME,...]

BASE_URL is the server root, e.g. http://127.0.0.1:8080 (a trailing /v1 is accepted).
Each check prints `ok NAME`, `skip NAME` or `FAIL NAME: why`; the last line is
`N passed, M failed`; the exit code is 1 if any check failed.

--skip takes check names or group prefixes: `--skip kv` skips `kv` and `kv_bad`,
`--skip bad` skips every `bad_*` input check. `health` skipped means liveness is
probed with GET /v1/models instead of GET /health. `metrics` skipped (or the
`recompose_running_requests` gauge absent) makes the cancel check skip its metric part.

--expect-greedy FILE: JSON {"prompt": ..., "max_tokens": N, "text": ...}; the server's
temperature-0 completion of that prompt must equal `text` exactly.

Run it with the serve venv: bench/serve/setup_serve_peers.sh creates it.
"""
import argparse
import asyncio
import json
import sys
import time

import httpx
from openai import AsyncOpenAI, OpenAI

P = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
P.add_argument("base_url")
P.add_argument("model")
P.add_argument("--expect-greedy", metavar="FILE")
P.add_argument("--skip", default="", help="comma-separated check names or group prefixes")
P.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
ARGS = P.parse_args()

ROOT = ARGS.base_url.rstrip("/").removesuffix("/v1")
API = ROOT + "/v1"
MODEL = ARGS.model
SKIP = {s.strip() for s in ARGS.skip.split(",") if s.strip()}
# max_retries=0: a 429 or 5xx must surface, not be silently retried.
CLIENT = OpenAI(base_url=API, api_key="unused", max_retries=0, timeout=ARGS.timeout)
RAW = httpx.Client(timeout=ARGS.timeout)

PROMPT = "Once upon a time, in a small village by the sea, there lived"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]

CHECKS = []  # (name, function); a function raises AssertionError (or anything) to fail


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def skipped(name):
    return name in SKIP or any(name.startswith(s + "_") for s in SKIP)


def usage_ok(u, where):
    assert u is not None, f"{where}: no usage"
    assert u.prompt_tokens > 0 and u.completion_tokens >= 0, f"{where}: usage {u}"
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, f"{where}: usage does not add up: {u}"


def complete(prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return CLIENT.completions.create(model=MODEL, prompt=prompt, **kw)


def stream_text(prompt=PROMPT, **kw):
    """Streamed completion -> (text, finish_reason, usage or None, number of chunks)."""
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    text, finish, usage, n = "", None, None, 0
    for ch in CLIENT.completions.create(model=MODEL, prompt=prompt, stream=True, **kw):
        n += 1
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.text or ""
            finish = c.finish_reason or finish
    return text, finish, usage, n


def alive():
    """Liveness: GET /health, or GET /v1/models when `health` is skipped."""
    r = RAW.get(ROOT + ("/v1/models" if skipped("health") else "/health"))
    assert r.status_code == 200, f"liveness probe returned {r.status_code}"


# ---------------------------------------------------------------- basic endpoints
@check("health")
def _():
    alive()


@check("models")
def _():
    ids = [m.id for m in CLIENT.models.list().data]
    assert MODEL in ids, f"{MODEL!r} not in {ids}"


@check("completion")
def _():
    r = complete()
    assert r.object == "text_completion", r.object
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str) and r.choices[0].text, r
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    usage_ok(r.usage, "completion")


@check("completion_stream")
def _():
    text, finish, _, n = stream_text()
    ref = complete().choices[0].text
    assert n >= 2, f"only {n} chunks"
    assert finish in ("stop", "length"), finish
    assert text == ref, f"stream {text!r} != non-stream {ref!r}"


@check("completion_stream_usage")
def _():
    _, _, usage, _ = stream_text(stream_options={"include_usage": True})
    usage_ok(usage, "completion stream")


@check("sse_framing")
def _():
    # Raw SSE: `data: {json}` events separated by blank lines, ending with `data: [DONE]`.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with RAW.stream("POST", API + "/completions", json=body) as r:
        assert r.status_code == 200, r.status_code
        ctype = r.headers.get("content-type", "")
        assert ctype.startswith("text/event-stream"), f"content-type {ctype!r}"
        raw = r.read().decode()
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e.strip()]
    datas = [e for e in events if e.startswith("data:")]  # comments/pings (`:`) are allowed
    assert datas and datas[-1].strip() == "data: [DONE]", f"last event {events[-1:]!r}"
    for d in datas[:-1]:
        json.loads(d[len("data:"):])


@check("chat")
def _():
    r = CLIENT.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion", r.object
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str) and m.content, m
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    usage_ok(r.usage, "chat")


@check("chat_stream")
def _():
    # With include_usage: every chunk but the last has usage null; the last has
    # choices == [] and the usage of the whole request.
    chunks = list(CLIENT.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = CLIENT.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert text == ref.choices[0].message.content, f"stream {text!r} != non-stream {ref.choices[0].message.content!r}"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]), f"finish reasons {finishes}"
    last = chunks[-1]
    assert last.usage is not None, "no usage chunk at the end of the stream"
    assert last.choices == [], f"usage chunk has choices {last.choices}"
    usage_ok(last.usage, "chat stream")
    assert all(c.usage is None for c in chunks[:-1]), "usage on a non-final chunk"
    assert last.usage.completion_tokens == ref.usage.completion_tokens, (last.usage, ref.usage)


# ---------------------------------------------------------------- sampling semantics
@check("greedy")
def _():
    a, b = (complete(max_tokens=32).choices[0].text for _ in range(2))
    assert a == b, f"{a!r} != {b!r}"


@check("seed")
def _():
    a, b = (complete(max_tokens=32, temperature=0.8, seed=1234).choices[0].text for _ in range(2))
    assert a == b, f"same seed, different text: {a!r} != {b!r}"


@check("stop")
def _():
    full = complete(max_tokens=32).choices[0].text
    assert len(full) >= 8, f"greedy text too short to pick a stop string: {full!r}"
    stop = full[len(full) // 2: len(full) // 2 + 3]  # may span tokens: tests partial matches
    want = full[:full.find(stop)]
    r = complete(max_tokens=32, stop=[stop])
    assert r.choices[0].text == want, f"stop={stop!r}: got {r.choices[0].text!r}, want {want!r}"
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    text, finish, _, _ = stream_text(max_tokens=32, stop=[stop])
    assert text == want, f"streamed with stop={stop!r}: got {text!r}, want {want!r}"
    assert finish == "stop", finish


@check("max_tokens")
def _():
    r = complete(max_tokens=5)
    assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
    assert r.usage.completion_tokens == 5, r.usage


@check("logprobs")
def _():
    r = complete(max_tokens=6, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert lp is not None, "no logprobs"
    n = r.usage.completion_tokens
    assert len(lp.tokens) == n and len(lp.token_logprobs) == n, (len(lp.tokens), n)
    assert "".join(lp.tokens) == c.text, f"tokens {lp.tokens} do not spell {c.text!r}"
    assert all(x <= 1e-6 for x in lp.token_logprobs), lp.token_logprobs
    assert lp.top_logprobs and len(lp.top_logprobs) == n, lp.top_logprobs
    assert all(1 <= len(t) <= 3 and all(v <= 1e-6 for v in t.values()) for t in lp.top_logprobs), lp.top_logprobs
    # greedy: the chosen token is the most likely one
    for tok, t in zip(lp.tokens, lp.top_logprobs):
        assert max(t, key=t.get) == tok, f"greedy picked {tok!r}, top_logprobs {t}"


@check("chat_logprobs")
def _():
    r = CLIENT.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.logprob <= 1e-6 and 1 <= len(t.top_logprobs) <= 2 for t in content), content


# ---------------------------------------------------------------- concurrency and cancel
@check("concurrency")
def _():
    prompts = [f"Story {i}: the {w} walked into the" for i, w in enumerate(
        "cat dog king queen sailor miller baker farmer poet judge child monk knight smith fox owl".split())]
    refs = [complete(p, max_tokens=32).choices[0].text for p in prompts]  # sequential references

    async def one(aclient, p):
        text = ""
        async for ch in await aclient.completions.create(model=MODEL, prompt=p, max_tokens=32,
                                                        temperature=0, stream=True):
            text += "".join(c.text or "" for c in ch.choices)
        return text

    async def all16():
        async with AsyncOpenAI(base_url=API, api_key="unused", max_retries=0, timeout=ARGS.timeout) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts), return_exceptions=True)

    got = asyncio.run(all16())
    bad = [f"#{i}: {g!r} != {r!r}" for i, (g, r) in enumerate(zip(got, refs)) if g != r]
    assert not bad, f"{len(bad)}/16 streams differ: " + "; ".join(bad[:3])


def running_requests():
    """Sum of the recompose_running_requests gauge, or None if /metrics or the gauge is absent."""
    r = RAW.get(ROOT + "/metrics")
    if r.status_code != 200:
        return None
    vals = [float(line.split()[-1]) for line in r.text.splitlines()
            if line.startswith("recompose_running_requests") and not line.startswith("#")
            and line.split()[0].split("{")[0] == "recompose_running_requests"]
    return sum(vals) if vals else None


@check("cancel")
def _():
    prompt = "List the numbers from one to one thousand, separated by commas: one, two, three,"
    stream = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=2000, temperature=0, stream=True)
    n = 0
    for _ in stream:
        n += 1
        if n == 5:
            break
    stream.close()  # drops the connection mid-stream
    assert n == 5, f"stream ended after {n} chunks, before it could be cancelled"
    t0 = time.time()
    r = complete(max_tokens=4)  # the server must still serve, without finishing the 2000 tokens first
    assert r.choices[0].text is not None
    alive()
    print(f"  (cancel: next request took {time.time() - t0:.2f} s)")
    if skipped("metrics"):
        print("  (cancel: metrics check skipped)")
        return
    val = None
    for _ in range(10):  # up to ~5 s for the server to notice the disconnect
        val = running_requests()
        if val is None or val == 0:
            break
        time.sleep(0.5)
    if val is None:
        print("  (cancel: no recompose_running_requests gauge; metric check skipped)")
    else:
        assert val == 0, f"recompose_running_requests = {val} after the disconnect"


# ---------------------------------------------------------------- extension: per-request kv
@check("kv")
def _():
    r = complete(max_tokens=8, extra_body={"kv": "h2o:0.2"})
    assert r.choices[0].text, r


# ---------------------------------------------------------------- bad input (raw HTTP)
def expect_error(path, body, codes, raw=False):
    data = body if raw else json.dumps(body)
    # a fresh connection per case: a server that drops the connection after an error
    # must not make the next case fail
    r = httpx.post(API + path, content=data, headers={"content-type": "application/json"}, timeout=ARGS.timeout)
    assert r.status_code in codes, f"status {r.status_code} (want {codes}): {r.text[:200]!r}"
    try:
        err = r.json()["error"]
    except Exception:
        raise AssertionError(f"body is not {{'error': ...}}: {r.text[:200]!r}")
    assert isinstance(err.get("message"), str) and err["message"], f"no error.message: {err}"
    missing = [k for k in ("type", "param", "code") if k not in err]
    assert not missing, f"error object lacks {missing}: {err}"
    return r


@check("bad_json")
def _():
    expect_error("/completions", '{"model": "x", "prompt": ', [400], raw=True)


@check("bad_missing_prompt")
def _():
    expect_error("/completions", {"model": MODEL, "max_tokens": 4}, [400])


@check("bad_missing_messages")
def _():
    expect_error("/chat/completions", {"model": MODEL, "max_tokens": 4}, [400])


@check("bad_wrong_type")
def _():
    expect_error("/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, [400])


@check("bad_unknown_model")
def _():
    expect_error("/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, [404])


@check("bad_negative_max_tokens")
def _():
    expect_error("/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, [400])


@check("bad_huge_prompt")
def _():
    words = ("the quick brown fox jumps over a lazy dog " * 2500).split()[:20000]
    expect_error("/completions", {"model": MODEL, "prompt": " ".join(words), "max_tokens": 4}, [413, 400])


@check("kv_bad")
def _():
    expect_error("/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "kv": "h2o:banana"}, [400])


@check("alive_after")
def _():
    alive()


@check("expect_greedy")
def _():
    spec = json.load(open(ARGS.expect_greedy))
    got = complete(spec["prompt"], max_tokens=spec["max_tokens"]).choices[0].text
    assert got == spec["text"], f"got {got!r}, want {spec['text']!r}"


def main():
    passed = failed = 0
    for name, fn in CHECKS:
        if skipped(name) or (name == "expect_greedy" and not ARGS.expect_greedy):
            print(f"skip {name}")
            continue
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok {name} ({time.time() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - any exception is a failed check
            failed += 1
            why = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            print(f"FAIL {name}: {why[:600]}")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
