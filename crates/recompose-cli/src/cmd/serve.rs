//! `recompose serve`: the OpenAI-compatible server (docs/SERVE.md).

use crate::common::{parse_kv, ModelArgs, KV_HELP};
use anyhow::{Context, Result};
use recompose_llm::generate::{StepPolicy, TokenBudget};
use recompose_serve::metrics::{External, Reading};
use recompose_serve::{router, serve, AppState, Engine, EngineConfig, Limits};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Default KV-cache policy; a request may choose its own with the "kv" field.
    #[arg(long, default_value = "full", value_parser = parse_kv, help = KV_HELP)]
    kv: recompose_kv::KvSpec,
    /// Most requests decoded together (the running batch).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Tokens per step while requests are decoding: one per decoding request, the rest spent on
    /// waiting prompts (chunked prefill). Larger gives new requests their first token sooner,
    /// smaller keeps the running streams' inter-token latency low.
    #[arg(long, default_value_t = TokenBudget::default().busy)]
    step_tokens: usize,
    /// Tokens per step while every request is still on its prompt (long prompts are prefilled
    /// in chunks of this many).
    #[arg(long, default_value_t = TokenBudget::default().idle)]
    prefill_chunk: usize,
    /// Keep up to MIB of KV for prompt prefixes (system prompts, earlier chat turns) that later
    /// requests reuse instead of prefilling; least recently used evicted first. Requests with a
    /// bounded KV policy neither use nor fill it. With quantised weights a reused prefix gives
    /// exactly the outputs of a full prefill (docs/SERVE.md).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    prefix_cache: usize,
    /// Turn the prefix cache off.
    #[arg(long, conflicts_with = "prefix_cache")]
    no_prefix_cache: bool,
    /// Which running requests a step takes when --step-rows is below them: decode-first
    /// (default), prefill-first, or expert (Read-ME's expert-aware batching: the requests whose
    /// next token goes to the expert with the longest queue; needs a pre-gated --moe, whose
    /// router then runs ahead of the backbone).
    #[arg(long, default_value = "decode-first")]
    batching: recompose_llm::batching::Batching,
    /// Most requests one step takes (default: every running one).
    #[arg(long, value_name = "N")]
    step_rows: Option<usize>,
    /// Steps expert-aware batching may pass a request over before it must run.
    #[arg(long, default_value_t = 16)]
    max_wait: usize,
    /// Most requests waiting for a place in the batch; beyond it requests get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds to let running requests finish after SIGINT/SIGTERM before exiting; connections
    /// still open then are closed.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Most connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client has to send a request's header (an idle kept-alive connection is closed
    /// after as long), and again its body; a late body is answered 408.
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
}

async fn shutdown_signal(draining: Arc<std::sync::atomic::AtomicBool>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    say!("shutting down: no new requests, finishing the running ones");
    draining.store(true, Ordering::SeqCst);
}

/// The prefix cache's budget in bytes: at least 1 MiB and no more than the machine's memory.
fn prefix_cache_bytes(mib: usize) -> Result<usize> {
    if mib == 0 {
        anyhow::bail!("--prefix-cache must be at least 1 MiB (--no-prefix-cache turns it off)");
    }
    let bytes = mib.checked_mul(1 << 20).context("--prefix-cache is too large")?;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
        line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kib| kib * 1024)
    });
    if let Some(total) = total.filter(|&t| bytes > t) {
        anyhow::bail!("--prefix-cache {mib} MiB is more than this machine's {} MiB of memory", total >> 20);
    }
    Ok(bytes)
}

/// The expert store's counters for /metrics.
fn store_metrics(s: Arc<recompose_moe::store::ExpertStore>) -> Vec<External> {
    use recompose_serve::metrics::Reading::{Count, Value};
    type Read = fn(&recompose_moe::store::StoreStats) -> Reading;
    let fields: [(&'static str, &'static str, bool, Read); 7] = [
        ("recompose_expert_hits", "Expert uses found resident (per layer)", true, |s| Count(s.hits)),
        ("recompose_expert_loads", "Expert parts read from the store (per layer)", true, |s| Count(s.loads)),
        ("recompose_expert_load_bytes", "Bytes read from the expert store", true, |s| Count(s.bytes_read)),
        ("recompose_expert_load_seconds", "Seconds spent reading and unpacking experts", true, |s| {
            Value(s.load_seconds)
        }),
        ("recompose_expert_wait_seconds", "Seconds the blocks waited for experts", true, |s| Value(s.wait_seconds)),
        ("recompose_expert_hit_rate", "Hits over all expert uses since start", false, |s| Value(s.hit_rate())),
        ("recompose_expert_resident_bytes", "Bytes of experts resident", false, |s| Count(s.resident_bytes)),
    ];
    fields
        .into_iter()
        .map(|(name, help, counter, f)| {
            let s = s.clone();
            External { name, help, counter, read: Box::new(move || f(&s.stats())) }
        })
        .collect()
}

pub fn run(a: Args) -> Result<()> {
    if [a.max_batch, a.max_queue, a.max_connections, a.read_timeout as usize, a.step_tokens, a.prefill_chunk]
        .contains(&0)
    {
        anyhow::bail!(
            "--max-batch, --max-queue, --max-connections, --read-timeout, --step-tokens and --prefill-chunk must be at least 1"
        );
    }
    let prefix_cache = if a.no_prefix_cache { None } else { Some(prefix_cache_bytes(a.prefix_cache)?) };
    let limits = Limits {
        max_connections: a.max_connections,
        read_timeout: Duration::from_secs(a.read_timeout),
        ..Limits::default()
    };
    anyhow::ensure!(a.step_rows != Some(0), "--step-rows must be at least 1");
    let (_file, model, tok, store) = a.model.load_with_store()?;
    if a.batching == recompose_llm::batching::Batching::ExpertAware && model.pregate().is_none() {
        anyhow::bail!(
            "--batching expert needs a pre-gated MoE (--moe DIR with a router): routes known before the blocks"
        );
    }
    let tok = Arc::new(tok);
    let (engine, scheduler) = Engine::start(
        model,
        tok.clone(),
        EngineConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            budget: TokenBudget { busy: a.step_tokens, idle: a.prefill_chunk },
            prefix_cache,
            on_idle: Some(crate::common::return_freed_memory),
            external_metrics: store.map(store_metrics).unwrap_or_default(),
            policy: StepPolicy {
                batching: a.batching,
                max_rows: a.step_rows.unwrap_or(usize::MAX),
                max_wait: a.max_wait,
            },
        },
    )
    .context("starting the scheduler")?;
    let state = Arc::new(AppState {
        engine: engine.clone(),
        tok,
        model_id: a.model.model.clone(),
        default_kv: a.kv.clone(),
        limits: limits.clone(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let deadline = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        say!("listening on http://{addr} (model {}, kv {})", a.model.model, a.kv);
        let grace = Duration::from_secs(a.shutdown_grace);
        Ok::<_, anyhow::Error>(
            serve(listener, router(state), &limits, shutdown_signal(engine.draining.clone()), grace).await,
        )
    })?;
    // Connections are closed; the scheduler has what is left of the grace period to wind down.
    while !scheduler.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    say!("stopped");
    Ok(())
}
