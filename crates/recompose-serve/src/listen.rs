//! The one HTTP limits layer: the accept loop, with a connection limit, header and body read
//! timeouts, size limits on the request line, headers and body, and a shutdown that closes idle
//! connections, lets running ones finish and abandons the rest when the grace period ends.
//!
//! axum's own `serve` waits for every connection at shutdown, however long a client takes to
//! send its header, so a half-sent request kept the process alive forever.

use crate::api::ApiError;
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// What one client may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time to send a request's header (or, on a kept-alive connection, to start the next one),
    /// and again to send its body.
    pub read_timeout: Duration,
    /// Request body bytes (8 MiB holds a 128k-token prompt as text or as ids).
    pub max_body: usize,
    /// Request-line target bytes.
    pub max_uri: usize,
    /// Header count and total header bytes.
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            read_timeout: Duration::from_secs(30),
            max_body: 8 << 20,
            max_uri: 8 << 10,
            max_headers: 64,
            max_header_bytes: 32 << 10,
        }
    }
}

impl Limits {
    /// The request line and headers, checked before routing, so the answer is an OpenAI error
    /// rather than the parser's bare status. (Past hyper's own buffer, 400 KB, and its 2x header
    /// count, hyper answers 431/414 itself, with an empty body, before any of this runs.)
    pub fn check_head<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if uri > self.max_uri {
            return Err(too_large(414, format!("the request target has {uri} bytes; the limit is {}", self.max_uri)));
        }
        let n = req.headers().len();
        let bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        if n > self.max_headers || bytes > self.max_header_bytes {
            return Err(too_large(
                431,
                format!(
                    "the request has {n} headers in {bytes} bytes; the limits are {} and {}",
                    self.max_headers, self.max_header_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Reads a request body within the size limit and the read timeout.
    pub async fn read_body(&self, headers: &axum::http::HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
        let declared =
            headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let limit = self.max_body;
        let over = |n: u64| too_large(413, format!("the request body has {n} bytes or more; the limit is {limit}"));
        if let Some(n) = declared.filter(|n| *n > limit as u64) {
            return Err(over(n));
        }
        let read = async {
            let mut out = Vec::with_capacity(declared.unwrap_or(0) as usize);
            let mut frames = body.into_data_stream();
            while let Some(chunk) = frames.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::bad("body", format!("the request body could not be read: {e}")))?;
                if out.len() + chunk.len() > limit {
                    return Err(over((out.len() + chunk.len()) as u64));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        match tokio::time::timeout(self.read_timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::status(
                408,
                "invalid_request_error",
                format!("the request body did not arrive within {} s", self.read_timeout.as_secs_f32()),
            )),
        }
    }
}

fn too_large(status: u16, message: String) -> ApiError {
    ApiError::status(status, "invalid_request_error", message)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, closes idle
/// connections, and waits up to `grace` for the rest. Returns when that wait ends: the instant
/// the grace period runs out, for whatever else must finish within it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Instant {
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own limits sit above ours, so ours answer first with an OpenAI body.
    http.timer(TokioTimer::new()).header_read_timeout(limits.read_timeout).max_headers(limits.max_headers * 2);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    // Out of descriptors or a connection reset while queued: wait, go on.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    conns.spawn(refuse(stream, limits.max_connections));
                    continue;
                };
                let started = Arc::new(AtomicBool::new(false));
                let service = Started { inner: TowerToHyperService::new(app.clone()), started: started.clone() };
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let mut stopped = stopped.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                    // A connection whose first request never arrived whole (half a header) is
                    // dropped: hyper counts it busy and would wait for it until the grace ended.
                    if !started.load(Ordering::SeqCst) {
                        return;
                    }
                    // Idle between requests: closed now. Mid-request: closed after its response.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + grace;
    let _ = stop.send(true);
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        conns.abort_all();
    }
    deadline
}

/// A connection's service that notes when its first request has arrived whole.
struct Started<S> {
    inner: S,
    started: Arc<AtomicBool>,
}

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for Started<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn call(&self, req: R) -> Self::Future {
        self.started.store(true, Ordering::SeqCst);
        self.inner.call(req)
    }
}

/// Answers a connection over the limit with a 503 and closes it, without reading its request.
async fn refuse(mut stream: tokio::net::TcpStream, limit: usize) {
    let body = ApiError::status(503, "server_error", format!("the server has {limit} connections open; retry shortly"))
        .body()
        .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Read what the client sent while it reads the answer: closing on unread bytes resets the
    // connection, and the client might never see the 503.
    let answer = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}
