#!/usr/bin/env python3
"""The server under abuse: half-open connections next to live streams, then SIGTERM.

    python3 bench/serve/abuse.py [--bin target/release/recompose] [--model smollm2-135m]
        [--half-open 100] [--streams 32] [--grace 20] [--json bench/results/serve/abuse.json]

Standard library only. Starts `recompose serve` and measures its idle RSS after two warm-up
requests. Round 1: opens --half-open connections that send half a request header and wait,
runs --streams streaming completions (64 tokens each) beside them, checks /health answers
meanwhile, then closes the half-open connections and reads RSS again (the goal: within 10% of
idle). Round 2: the same abuse, SIGTERM once every stream has its first token; every stream
must finish with [DONE] and the process must exit 0 within --grace seconds.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import threading
import time

PROMPT = ("It was a bright cold morning and the town was only beginning to wake. The baker had lit "
          "his ovens before dawn, and the fishermen were already far out on the grey water.")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def request(addr, method, path, body=b"", timeout=120):
    """One HTTP/1.1 request on its own connection: (status, body bytes)."""
    host, port = addr.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        s.sendall(head.encode() + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


class Stream(threading.Thread):
    """A streaming completion; records when its first token came and whether [DONE] did."""

    def __init__(self, addr, model):
        super().__init__(daemon=True)
        self.addr, self.model = addr, model
        self.first = threading.Event()
        self.done, self.chunks, self.error = False, 0, None

    def run(self):
        body = json.dumps({"model": self.model, "prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        host, port = self.addr.split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=300) as s:
                s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {self.addr}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
                buf = b""
                while chunk := s.recv(65536):
                    buf += chunk
                    n = buf.count(b"data: {")
                    if n > self.chunks:
                        self.chunks = n
                        self.first.set()
                self.done = b"data: [DONE]" in buf
                if not self.done:
                    self.error = buf[:200].decode(errors="replace")
        except OSError as e:
            self.error = repr(e)
        self.first.set()


def half_open(addr, n):
    host, port = addr.split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        socks.append(s)
    return socks


def start(binary, model, grace):
    p = subprocess.Popen([binary, "serve", "--model", model, "--port", "0", "--shutdown-grace", str(grace)],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on http://" in line:
            addr = line.split("http://")[1].split()[0]
            break
    else:
        raise SystemExit("the server exited before listening")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, addr


def abuse(p, addr, model, n_half, n_streams):
    held = half_open(addr, n_half)
    streams = [Stream(addr, model) for _ in range(n_streams)]
    for s in streams:
        s.start()
    t0 = time.time()
    code, _ = request(addr, "GET", "/health")
    health_ms = (time.time() - t0) * 1000
    return held, streams, code, health_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/recompose")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--half-open", type=int, default=100)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--grace", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    p, addr = start(a.bin, a.model, a.grace)
    model = json.loads(request(addr, "GET", "/v1/models")[1])["data"][0]["id"]
    warm = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 64, "temperature": 0}).encode()
    for _ in range(2):
        assert request(addr, "POST", "/v1/completions", warm)[0] == 200
    time.sleep(1)
    idle = rss_mib(p.pid)

    # Round 1: memory.
    held, streams, health1, health_ms1 = abuse(p, addr, model, a.half_open, a.streams)
    peak = idle
    while any(s.is_alive() for s in streams):
        peak = max(peak, rss_mib(p.pid))
        time.sleep(0.05)
    ok1 = sum(s.done for s in streams)
    for s in held:
        s.close()
    time.sleep(2)
    after = rss_mib(p.pid)

    # Round 2: SIGTERM under the same abuse.
    held, streams, health2, health_ms2 = abuse(p, addr, model, a.half_open, a.streams)
    for s in streams:
        s.first.wait(120)
    t_term = time.time()
    p.send_signal(signal.SIGTERM)
    for s in streams:
        s.join(a.grace + 30)
    try:
        rc = p.wait(a.grace + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = "killed"
    exit_s = time.time() - t_term
    ok2 = sum(s.done for s in streams)
    errors = [s.error for s in streams if s.error][:3]
    for s in held:
        s.close()

    r = {
        "half_open": a.half_open, "streams": a.streams, "grace_s": a.grace,
        "idle_rss_mib": round(idle, 1), "peak_rss_mib": round(peak, 1), "after_rss_mib": round(after, 1),
        "after_over_idle": round(after / idle, 3),
        "round1_streams_done": ok1, "round1_health": health1, "round1_health_ms": round(health_ms1, 1),
        "round2_streams_done": ok2, "round2_health": health2, "round2_health_ms": round(health_ms2, 1),
        "exit_code": rc, "exit_after_sigterm_s": round(exit_s, 2), "stream_errors": errors,
    }
    print(f"| half-open | streams | idle RSS | peak RSS | RSS after | after/idle | streams done (r1, r2) "
          f"| /health during | exit after SIGTERM |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.half_open} | {a.streams} | {idle:.0f} MiB | {peak:.0f} MiB | {after:.0f} MiB | {after / idle:.3f} "
          f"| {ok1}/{a.streams}, {ok2}/{a.streams} | {health1} in {health_ms1:.0f} ms, {health2} in {health_ms2:.0f} ms "
          f"| {exit_s:.2f} s (exit {rc}, grace {a.grace} s) |")
    if errors:
        print("stream errors:", errors)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    good = (ok1 == ok2 == a.streams and rc == 0 and exit_s <= a.grace and after / idle <= 1.10
            and health1 == health2 == 200)
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()
