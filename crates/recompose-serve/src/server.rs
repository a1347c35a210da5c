//! The HTTP side: axum routes for the OpenAI endpoints, health and metrics; requests become
//! scheduler jobs, events become JSON or server-sent events.

use crate::api::{self, ApiError, Params, Prompt};
use crate::engine::{Engine, Event, Job};
use crate::listen::Limits;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::Stream;
use recompose_core::chat::{self, Message};
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::generate::{FinishReason, GenerateOptions, TokenLogprob};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

pub struct AppState {
    pub engine: Engine,
    pub tok: Arc<Tokenizer>,
    /// The id clients must name in `model`.
    pub model_id: String,
    pub default_kv: KvSpec,
    pub limits: Limits,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Every request passes here: the request line and headers are held to the limits, and an
/// error that the router itself answers (405 for a wrong method) gets an OpenAI body like ours.
async fn guard(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Err(e) = s.limits.check_head(&req) {
        return error(&s, e);
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    let json = r.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(r.status().is_client_error() || r.status().is_server_error()) {
        return r;
    }
    let status = r.status();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        _ => format!("{method} {path}: {}", status.canonical_reason().unwrap_or("error")),
    };
    let (mut parts, _) = r.into_parts();
    let body = ApiError::status(status.as_u16(), "invalid_request_error", message).body();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    s.engine.metrics.request(status.as_u16());
    Response::from_parts(parts, Body::from(body.to_string()))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn error(state: &AppState, e: ApiError) -> Response {
    state.engine.metrics.request(e.status);
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, axum::Json(e.body())).into_response();
    if e.status == 429 || e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn not_found(State(s): State<Shared>) -> Response {
    error(&s, ApiError::status(404, "not_found_error", "no such endpoint"))
}

async fn health(State(s): State<Shared>) -> Response {
    if s.engine.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "shutting down"}))).into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], s.engine.metrics.render()).into_response()
}

async fn models(State(s): State<Shared>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "recompose"}]}))
        .into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Kind::Completion).await
}

async fn chat_completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Kind::Chat).await
}

/// Turns a request into token ids and parameters, or the error to answer with.
fn prepare(s: &AppState, body: &[u8], kind: Kind) -> Result<(Params, Vec<u32>), ApiError> {
    let m = api::parse_json(body)?;
    let p = api::parse_params(&m, kind == Kind::Chat)?;
    if p.model != s.model_id {
        return Err(ApiError {
            status: 404,
            message: format!("model '{}' does not exist (this server has '{}')", p.model, s.model_id),
            param: Some("model".into()),
            kind: "not_found_error",
        });
    }
    let tok_err = |e: recompose_core::Error| ApiError::status(400, "invalid_request_error", format!("tokenizer: {e}"));
    let ids = match kind {
        Kind::Completion => match api::parse_prompt(&m)? {
            Prompt::Text(t) => s.tok.encode(&t, true).map_err(tok_err)?,
            Prompt::Ids(ids) => {
                let vocab = s.tok.vocab_size() as u32;
                if let Some(bad) = ids.iter().find(|i| **i >= vocab) {
                    return Err(ApiError::bad("prompt", format!("token id {bad} is outside the vocabulary ({vocab})")));
                }
                ids
            }
        },
        Kind::Chat => {
            let msgs: Vec<Message> =
                api::parse_messages(&m)?.into_iter().map(|c| Message { role: c.role, content: c.content }).collect();
            let template = s
                .tok
                .chat_template
                .as_deref()
                .ok_or_else(|| ApiError::status(400, "invalid_request_error", "this model has no chat template"))?;
            let bos = s.tok.bos.and_then(|b| s.tok.id_to_token(b)).unwrap_or_default();
            let text = chat::render(template, &msgs, true, &bos, "")
                .map_err(|e| ApiError::bad("messages", format!("chat template: {e}")))?;
            // A chat template writes BOS itself when the model wants one.
            s.tok.encode(&text, false).map_err(tok_err)?
        }
    };
    let ctx = s.engine.context;
    if ids.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if ids.len() >= ctx {
        return Err(ApiError {
            status: 413,
            message: format!("the prompt has {} tokens; the model's context is {ctx}", ids.len()),
            param: Some(if kind == Kind::Chat { "messages" } else { "prompt" }.into()),
            kind: "invalid_request_error",
        });
    }
    if let Some(n) = p.max_tokens.filter(|n| *n > ctx) {
        return Err(ApiError::bad("max_tokens", format!("max_tokens {n} is larger than the model's context ({ctx})")));
    }
    Ok((p, ids))
}

async fn handle(s: Shared, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let body = match s.limits.read_body(&headers, body).await {
        Ok(b) => b,
        Err(e) => return error(&s, e),
    };
    // Off the async workers: a chat template may run for a while (within its fuel), and /health
    // and shutdown must not wait for it.
    let st = s.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&st, &body, kind)).await;
    let (p, ids) = match prepared {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return error(&s, e),
        Err(e) => return error(&s, ApiError::status(500, "server_error", format!("preparing the request: {e}"))),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let max_tokens = p.max_tokens.unwrap_or(match kind {
        Kind::Completion => 16,
        Kind::Chat => s.engine.context - ids.len(),
    });
    let job = Job {
        prompt: ids,
        opts: GenerateOptions {
            max_tokens,
            sampling: p.sampling.clone(),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            stop: p.stop.clone(),
            logprobs: p.logprobs,
            ignore_eos: false,
        },
        kv: p.kv.clone().unwrap_or_else(|| s.default_kv.clone()),
        events: tx,
        arrived: Instant::now(),
    };
    if s.engine.submit(job).is_err() {
        return if s.engine.draining.load(Ordering::SeqCst) {
            error(&s, ApiError::status(503, "server_error", "the server is shutting down"))
        } else {
            error(&s, ApiError::status(429, "rate_limit_error", "the request queue is full; retry shortly"))
        };
    }
    let id = format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>());
    let reply = Reply { id, created: now(), model: s.model_id.clone(), kind, logprobs: p.logprobs.is_some() };
    s.engine.metrics.request(200);
    if p.stream {
        let stream = sse_stream(reply, rx, p.include_usage);
        return axum::response::Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    }
    collect(reply, rx).await
}

/// What every response or chunk repeats.
#[derive(Clone)]
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    logprobs: bool,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

fn chat_logprob(l: &TokenLogprob) -> Value {
    let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    let mut e = entry(&l.token, l.logprob);
    e["top_logprobs"] = Value::Array(l.top.iter().map(|(t, lp)| entry(t, *lp)).collect());
    e
}

/// Legacy completions logprobs for a run of tokens.
fn completion_logprobs(ls: &[TokenLogprob], offset0: usize) -> Value {
    let mut off = offset0;
    let mut offsets = vec![];
    for l in ls {
        offsets.push(off);
        off += l.token.len();
    }
    json!({
        "tokens": ls.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": ls.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": ls.iter().map(|l| l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

async fn collect(reply: Reply, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut lps: Vec<TokenLogprob> = vec![];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { text: t, logprob } => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Event::Error(e) => {
                let e = ApiError::status(500, "server_error", e);
                return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(e.body())).into_response();
            }
            Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens } => {
                let choice = match reply.kind {
                    Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish.as_openai(),
                        "logprobs": if reply.logprobs { completion_logprobs(&lps, 0) } else { Value::Null }}),
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish.as_openai(),
                        "logprobs": if reply.logprobs { json!({"content": lps.iter().map(chat_logprob).collect::<Vec<_>>()}) } else { Value::Null }}),
                };
                let mut v = reply.wrap(false, json!([choice]));
                v["usage"] = usage(prompt_tokens, cached_tokens, completion_tokens);
                return axum::Json(v).into_response();
            }
        }
    }
    let e = ApiError::status(500, "server_error", "the request was dropped");
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(e.body())).into_response()
}

/// Events as OpenAI stream chunks, then the usage chunk (when asked) and `[DONE]`. Dropping the
/// stream (the client went away) drops the receiver, which cancels the request.
fn sse_stream(
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<Sse, std::convert::Infallible>> {
    struct St {
        rx: UnboundedReceiver<Event>,
        reply: Reply,
        first: bool,
        offset: usize,
        tail: Vec<Value>,
        done: bool,
    }
    let st = St { rx, reply, first: true, offset: 0, tail: vec![], done: false };
    futures_util::stream::unfold(st, move |mut st| async move {
        if let Some(v) = st.tail.pop() {
            let ev = match v {
                Value::Null => Sse::default().data("[DONE]"),
                v => Sse::default().data(v.to_string()),
            };
            return Some((Ok(ev), st));
        }
        if st.done {
            return None;
        }
        let chunk = |st: &St, text: &str, finish: Option<FinishReason>, lp: Option<&TokenLogprob>| -> Value {
            let f = finish.map(FinishReason::as_openai);
            let choice = match st.reply.kind {
                Kind::Completion => json!({"index": 0, "text": text, "finish_reason": f,
                    "logprobs": lp.map(|l| completion_logprobs(std::slice::from_ref(l), st.offset))}),
                Kind::Chat => {
                    let delta = match (st.first, finish) {
                        (_, Some(_)) if text.is_empty() => json!({}),
                        (true, _) => json!({"role": "assistant", "content": text}),
                        (false, _) => json!({"content": text}),
                    };
                    json!({"index": 0, "delta": delta, "finish_reason": f,
                        "logprobs": lp.map(|l| json!({"content": [chat_logprob(l)]}))})
                }
            };
            st.reply.wrap(true, json!([choice]))
        };
        loop {
            match st.rx.recv().await {
                Some(Event::Text { text, logprob }) => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let v = chunk(&st, &text, None, logprob.as_ref());
                    st.first = false;
                    st.offset += text.len();
                    return Some((Ok(Sse::default().data(v.to_string())), st));
                }
                Some(Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens }) => {
                    let v = chunk(&st, "", Some(finish), None);
                    // Sent in reverse: the finish chunk now, then usage, then [DONE].
                    st.tail.push(Value::Null);
                    if include_usage {
                        let mut u = st.reply.wrap(true, json!([]));
                        u["usage"] = usage(prompt_tokens, cached_tokens, completion_tokens);
                        st.tail.push(u);
                    }
                    st.done = true;
                    return Some((Ok(Sse::default().data(v.to_string())), st));
                }
                Some(Event::Error(e)) => {
                    st.done = true;
                    st.tail.push(Value::Null);
                    let v = ApiError::status(500, "server_error", e).body();
                    return Some((Ok(Sse::default().data(v.to_string())), st));
                }
                None => {
                    // The request ended without a result (it cannot, short of a bug): say so.
                    st.done = true;
                    st.tail.push(Value::Null);
                    let v = ApiError::status(500, "server_error", "the request was dropped").body();
                    return Some((Ok(Sse::default().data(v.to_string())), st));
                }
            }
        }
    })
}
