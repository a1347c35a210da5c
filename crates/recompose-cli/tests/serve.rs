//! `recompose serve` through real HTTP on a loopback port, with a tiny model: endpoints,
//! streaming, greedy output equal to `recompose generate`, 16 concurrent streams, cancel on
//! disconnect, the queue limit, every bad-input case, random bodies, and graceful shutdown.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
    model: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on a free port: on a tiny random model, or on `asset` (fetched into the
/// normal $RECOMPOSE_HOME on first use).
fn start_with(asset: Option<&str>, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = match asset {
        Some(a) => PathBuf::from(a),
        None => {
            let m = dir.path().join("tiny.gguf");
            write_tiny_gguf(&m, &TinySpec { seed: 3, ..Default::default() }).unwrap();
            m
        }
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recompose"));
    cmd.args(["serve", "--model", model.to_str().unwrap(), "--port", "0"]).args(extra);
    if asset.is_none() {
        cmd.env("RECOMPOSE_HOME", dir.path()).env("RAYON_NUM_THREADS", "1");
    }
    let (child, addr, mut err) = listen(cmd);
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        if std::env::var_os("RECOMPOSE_SERVE_LOG").is_some() {
            std::io::copy(&mut err, &mut std::io::stderr())
        } else {
            std::io::copy(&mut err, &mut std::io::sink())
        }
    });
    Server { child, addr, _dir: dir, model }
}

/// Spawns the server and waits for its "listening on" line: (child, address, its stderr).
fn listen(mut cmd: Command) -> (Child, String, BufReader<std::process::ChildStderr>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before listening");
        if let Some(rest) = line.trim().strip_prefix("listening on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    (child, addr, err)
}

/// One HTTP/1.1 request; returns (status, headers, body).
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, head.to_string(), body)
}

fn dechunk(b: &str) -> String {
    let mut out = String::new();
    let mut rest = b;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n..].trim_start_matches("\r\n");
    }
    out
}

fn post(addr: &str, path: &str, v: &Value) -> (u16, Value) {
    let (status, _, body) = http(addr, "POST", path, v.to_string().as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// SSE `data:` payloads of a streamed response.
fn events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_owned)).collect()
}

fn metric(addr: &str, name: &str) -> f64 {
    let (_, _, body) = http(addr, "GET", "/metrics", b"");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The tiny model on the exact f32 path; its model id is the file path given to --model.
fn start_tiny(extra: &[&str]) -> Server {
    let mut args = vec!["--f32"];
    args.extend_from_slice(extra);
    start_with(None, &args)
}

fn model_id(s: &Server) -> String {
    s.model.to_str().unwrap().to_string()
}

fn with_model(s: &Server, mut v: Value) -> Value {
    v["model"] = json!(model_id(s));
    v
}

#[test]
fn endpoints_streaming_and_greedy_equal_to_generate() {
    let s = start_tiny(&[]);
    let a = s.addr.as_str();
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
    let (code, _, body) = http(a, "GET", "/v1/models", b"");
    assert_eq!(code, 200);
    assert!(body.contains(&model_id(&s).replace('\\', "\\\\")), "{body}");

    let (code, v) = post(a, "/v1/completions", &with_model(&s, completion("Hello there", 12)));
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(v["usage"]["prompt_tokens"].as_u64().unwrap() + 12));

    // Greedy through the server = `recompose generate`.
    let out = Command::new(env!("CARGO_BIN_EXE_recompose"))
        .args([
            "generate",
            "--f32",
            "-m",
            s.model.to_str().unwrap(),
            "--prompt",
            "Hello there",
            "-n",
            "12",
            "--temperature",
            "0",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), text);

    // Streaming gives the same text, then a usage chunk, then [DONE].
    let mut req = with_model(&s, completion("Hello there", 12));
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (code, head, body) = http(a, "POST", "/v1/completions", req.to_string().as_bytes());
    assert_eq!(code, 200);
    assert!(head.to_ascii_lowercase().contains("text/event-stream"), "{head}");
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);

    // Chat, streamed: role first, content deltas, a finish chunk.
    let chat = with_model(
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": true}),
    );
    let (code, _, body) = http(a, "POST", "/v1/chat/completions", chat.to_string().as_bytes());
    // The tiny model has no chat template: a clean 400, not a crash.
    if code == 400 {
        assert!(body.contains("chat template"), "{body}");
    } else {
        assert_eq!(code, 200, "{body}");
    }

    // Stop strings, logprobs, seeded sampling.
    let mut r = with_model(&s, completion("Hello there", 12));
    r["logprobs"] = json!(3);
    let (_, v) = post(a, "/v1/completions", &r);
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(12), "{v}");
    // Three alternatives (fewer keys when two of them decode to the same text).
    assert!(lp["top_logprobs"][0].as_object().is_some_and(|o| (1..=3).contains(&o.len())), "{lp}");
    let stop: String = text.chars().skip(3).take(2).collect();
    let mut r = with_model(&s, completion("Hello there", 12));
    r["stop"] = json!([stop.clone()]);
    let (_, v) = post(a, "/v1/completions", &r);
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert!(!cut.contains(&stop) && text.starts_with(cut), "{cut:?} {stop:?} {text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let sampled = |seed: u64| {
        let mut r = with_model(&s, completion("Hello there", 10));
        r["temperature"] = json!(0.9);
        r["seed"] = json!(seed);
        post(a, "/v1/completions", &r).1["choices"][0]["text"].clone()
    };
    assert_eq!(sampled(5), sampled(5));
}

#[test]
fn sixteen_concurrent_streams_complete_and_match() {
    let s = start_tiny(&["--max-batch", "8"]);
    let a = s.addr.clone();
    let prompts: Vec<String> = (0..16).map(|i| format!("Story number {i}: once")).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(&a, "/v1/completions", &with_model(&s, completion(p, 20))).1["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let id = model_id(&s);
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (a, p, id) = (a.clone(), p.clone(), id.clone());
            // Mix KV policies within the batch.
            let kv = ["full", "h2o:8", "window:8,sinks=2", "full"][i % 4];
            std::thread::spawn(move || {
                let mut r = completion(&p, 20);
                r["model"] = json!(id);
                r["stream"] = json!(true);
                r["kv"] = json!(kv);
                r["stream_options"] = json!({"include_usage": true});
                let (code, _, body) = http(&a, "POST", "/v1/completions", r.to_string().as_bytes());
                assert_eq!(code, 200);
                let ev = events(&body);
                assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
                let chunks: Vec<Value> =
                    ev[..ev.len() - 1].iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
                let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
                let generated = chunks.last().map(|c| c["usage"]["completion_tokens"].clone());
                (kv, text, generated)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (kv, text, generated) = h.join().unwrap();
        assert_eq!(generated, Some(json!(20)), "stream {i} ({kv})");
        if kv == "full" {
            // With the full cache a request's output cannot depend on its neighbours.
            assert_eq!(text, alone[i], "stream {i}");
        }
    }
    assert_eq!(metric(&a, "recompose_running_requests"), 0.0);
}

#[test]
fn disconnect_cancels_and_a_full_queue_answers_429() {
    let s = start_tiny(&["--max-batch", "1", "--max-queue", "1"]);
    let a = s.addr.clone();
    // A long stream, abandoned after its first bytes.
    let mut r = with_model(&s, completion("Long", 200));
    r["stream"] = json!(true);
    r["temperature"] = json!(0.8);
    {
        let mut sock = TcpStream::connect(&a).unwrap();
        let body = r.to_string();
        let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(body.as_bytes()).unwrap();
        // Until the first token arrives: the response headers come before the scheduler has taken
        // the job from its queue, and a job still queued would fill the queue below.
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("data:") {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended before its first token");
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let t0 = Instant::now();
    while metric(&a, "recompose_running_requests") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "request not cancelled after disconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(&a, "recompose_generated_tokens_total") < 200.0, "the abandoned request ran to the end");

    // One running, one queued: the rest are turned away with 429 and Retry-After.
    let id = model_id(&s);
    let hs: Vec<_> = (0..6)
        .map(|_| {
            let (a, id) = (a.clone(), id.clone());
            std::thread::spawn(move || {
                let mut r = completion("Busy", 60);
                r["model"] = json!(id);
                http(&a, "POST", "/v1/completions", r.to_string().as_bytes())
            })
        })
        .collect();
    let res: Vec<(u16, String, String)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let limited: Vec<&(u16, String, String)> = res.iter().filter(|r| r.0 == 429).collect();
    assert!(!limited.is_empty(), "no 429 among {:?}", res.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(limited.iter().all(|r| r.1.to_ascii_lowercase().contains("retry-after")));
    assert!(
        res.iter().any(|r| r.0 == 200),
        "no 200 among {:?}",
        res.iter().map(|r| (r.0, r.2.chars().take(200).collect::<String>())).collect::<Vec<_>>()
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = start_tiny(&[]);
    let a = s.addr.as_str();
    let long = "word ".repeat(400);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid JSON"),
        (with_model(&s, json!({"max_tokens": 3})).to_string().into_bytes(), 400, "prompt"),
        (with_model(&s, json!({"prompt": "a", "max_tokens": "ten"})).to_string().into_bytes(), 400, "max_tokens"),
        (json!({"model": "gpt-9", "prompt": "a"}).to_string().into_bytes(), 404, "gpt-9"),
        (with_model(&s, json!({"prompt": "a", "max_tokens": -5})).to_string().into_bytes(), 400, "max_tokens"),
        (with_model(&s, json!({"prompt": "a", "max_tokens": 100000})).to_string().into_bytes(), 400, "context"),
        (with_model(&s, json!({"prompt": long})).to_string().into_bytes(), 413, "context"),
        (with_model(&s, json!({"prompt": "a", "kv": "h2o:banana"})).to_string().into_bytes(), 400, "kv"),
        (with_model(&s, json!({"prompt": "a", "temperature": "hot"})).to_string().into_bytes(), 400, "temperature"),
        (with_model(&s, json!({"messages": "hi"})).to_string().into_bytes(), 400, "messages"),
    ];
    for (body, want, needle) in cases {
        let path = if needle == "messages" { "/v1/chat/completions" } else { "/v1/completions" };
        let (code, _, resp) = http(a, "POST", path, &body);
        assert_eq!(code, want, "{}: {resp}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_str(&resp).unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle) || v["error"]["param"].as_str() == Some(needle), "{resp}");
    }
    assert_eq!(http(a, "GET", "/nope", b"").0, 404);
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
}

#[test]
fn random_bodies_never_crash_the_server() {
    let s = start_tiny(&[]);
    let a = s.addr.as_str();
    let id = model_id(&s);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let values = [
        json!(null),
        json!(-1),
        json!(0),
        json!(1e308),
        json!("x"),
        json!([]),
        json!({}),
        json!([1, "a"]),
        json!(true),
        json!(2),
        json!(0.5),
    ];
    let keys = [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "stop",
        "seed",
        "stream",
        "logprobs",
        "kv",
        "n",
        "messages",
        "stream_options",
    ];
    for i in 0..150 {
        let body: Vec<u8> = match i % 3 {
            0 => (0..rnd() % 64).map(|_| (rnd() % 256) as u8).collect(),
            1 => {
                let full = json!({"model": id, "prompt": "hello", "max_tokens": 2}).to_string();
                full.as_bytes()[..(rnd() as usize % full.len())].to_vec()
            }
            _ => {
                let mut v = json!({"model": id, "prompt": "hello", "max_tokens": 2});
                for _ in 0..3 {
                    let k = keys[(rnd() % keys.len() as u64) as usize];
                    v[k] = values[(rnd() % values.len() as u64) as usize].clone();
                }
                v.to_string().into_bytes()
            }
        };
        let path = if rnd() % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
        let (code, _, resp) = http(a, "POST", path, &body);
        assert!(code == 200 || (400..500).contains(&code), "{code} for {:?}: {resp}", String::from_utf8_lossy(&body));
    }
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_running_requests_and_exits_zero() {
    let mut s = start_tiny(&[]);
    let a = s.addr.clone();
    let id = model_id(&s);
    let h = std::thread::spawn(move || {
        let mut r = completion("Before the end", 40);
        r["model"] = json!(id);
        post(&a, "/v1/completions", &r)
    });
    std::thread::sleep(Duration::from_millis(150));
    sigterm(&s.child);
    let (code, v) = h.join().unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let st = wait_exit(&mut s.child, Duration::from_secs(20));
    assert!(st.success(), "exit status {st}");
}

/// A server whose stderr reader has gone away still serves and shuts down cleanly on SIGTERM
/// (its "shutting down" line used to panic: "failed printing to stderr", exit 101).
#[cfg(unix)]
#[test]
fn sigterm_with_stderr_closed_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny.gguf");
    write_tiny_gguf(&m, &TinySpec { seed: 3, ..Default::default() }).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recompose"));
    cmd.args(["serve", "--f32", "--model", m.to_str().unwrap(), "--port", "0"]);
    cmd.env("RECOMPOSE_HOME", dir.path()).env("RAYON_NUM_THREADS", "1");
    let (mut child, addr, err) = listen(cmd);
    drop(err);
    let mut r = completion("Still here", 4);
    r["model"] = json!(m.to_str().unwrap());
    assert_eq!(post(&addr, "/v1/completions", &r).0, 200);
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(20));
    assert!(st.success(), "exit status {st}");
}

/// Waits for the process to exit, failing the test past `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < limit, "server did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

/// Sends raw bytes on a new connection and returns it (to read from, or to hold open).
fn raw(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(bytes).unwrap();
    c
}

/// (status, parsed JSON body) of what the server answered on `c`.
fn answer(c: &mut TcpStream) -> (u16, Value) {
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A client that sends half a header and waits used to keep the server from exiting on SIGTERM
/// forever, whatever --shutdown-grace said.
#[cfg(unix)]
#[test]
fn a_half_sent_header_does_not_block_shutdown() {
    let mut s = start_tiny(&["--shutdown-grace", "2"]);
    let _held = raw(&s.addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le");
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&s.child);
    let st = wait_exit(&mut s.child, Duration::from_secs(6));
    assert!(st.success(), "exit status {st}");
}

/// Half-sent headers and bodies shorter than their Content-Length are timed out (they used to
/// hang until the client gave up); the late body gets an OpenAI 408.
#[test]
fn slow_clients_are_timed_out() {
    let s = start_tiny(&["--read-timeout", "1"]);
    let t0 = Instant::now();
    let mut half_header = raw(&s.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n");
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"model\"");
    let mut short_body = raw(&s.addr, head.as_bytes());
    let (code, v) = answer(&mut short_body);
    assert_eq!(code, 408, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("did not arrive"), "{v}");
    let mut rest = vec![];
    let _ = half_header.read_to_end(&mut rest);
    assert!(t0.elapsed() < Duration::from_secs(10), "timeouts took {:?}", t0.elapsed());
    assert_eq!(http(&s.addr, "GET", "/health", b"").0, 200);
}

/// Errors the router or the limits answer carry OpenAI JSON bodies like every other error
/// (405, 414 and 431 used to be empty, an oversized body plain text).
#[test]
fn router_and_limit_errors_are_openai_json() {
    let s = start_tiny(&[]);
    let a = s.addr.as_str();
    let long_uri = format!("/v1/models?{}", "a".repeat(10_000));
    let many_headers: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405, "GET is not allowed"),
        (
            format!("GET {long_uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(),
            414,
            "request target",
        ),
        (
            format!("GET /health HTTP/1.1\r\nHost: x\r\n{many_headers}Connection: close\r\n\r\n").into_bytes(),
            431,
            "headers",
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000000\r\nConnection: close\r\n\r\n{}"
                .to_vec(),
            413,
            "request body",
        ),
    ];
    for (req, want, needle) in cases {
        let (code, v) = answer(&mut raw(a, &req));
        assert_eq!(code, want, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "want {needle:?} in {v}");
    }
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
}

/// A connection over --max-connections gets a 503 with an OpenAI body at once, and the server
/// goes on serving the ones it holds.
#[test]
fn connections_over_the_limit_get_503() {
    let s = start_tiny(&["--max-connections", "2"]);
    let held: Vec<TcpStream> = (0..2).map(|_| raw(&s.addr, b"")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (code, v) = answer(&mut raw(&s.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("2 connections"), "{v}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(&s.addr, "GET", "/health", b"").0, 200);
}

/// A chat template is code from the model file: one that loops without end, or writes
/// gigabytes, fails its request with a 400, and the server goes on (the loop used to block
/// /health and shutdown forever, the output to abort the process).
#[test]
fn a_runaway_chat_template_is_a_400() {
    for (template, needle) in [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "instructions"),
        ("{% set s = 'x' * 100000000 %}{% for a in range(100000) %}{{ s }}{% endfor %}", "more than"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("t.gguf");
        write_tiny_gguf(&m, &TinySpec { seed: 3, chat_template: template, ..Default::default() }).unwrap();
        let s = start_with(Some(m.to_str().unwrap()), &[]);
        let chat =
            json!({"model": m.to_str().unwrap(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        let (code, v) = post(&s.addr, "/v1/chat/completions", &chat);
        assert_eq!(code, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "want {needle:?} in {v}");
        assert_eq!(http(&s.addr, "GET", "/health", b"").0, 200);
    }
}

/// The official `openai` Python client against the server (the script installs it in a venv).
#[test]
fn official_openai_client() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recompose-serve/tests/python/run_openai_client.sh");
    let s = start_with(Some("smollm2-135m"), &["--max-batch", "16"]);
    // The greedy completion `recompose generate` gives must come back through the client.
    let prompt = "Once upon a time, in a small village by the sea, there lived";
    let gen = Command::new(env!("CARGO_BIN_EXE_recompose"))
        .args(["generate", "--prompt", prompt, "-n", "24", "--temperature", "0"])
        .output()
        .unwrap();
    let expect = s._dir.path().join("greedy.json");
    let text = String::from_utf8_lossy(&gen.stdout).trim_end_matches('\n').to_string();
    std::fs::write(&expect, json!({"prompt": prompt, "max_tokens": 24, "text": text}).to_string()).unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(format!("http://{}", s.addr))
        .arg("smollm2-135m")
        .arg("--expect-greedy")
        .arg(&expect)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(so.contains(" passed, 0 failed"), "{so}");
}
