//! The scheduler: one thread owns the model and runs continuous batching. Requests wait in a
//! bounded queue, join the running batch at a token boundary, and leave it when they finish or
//! their client goes away. Each request has a KV cache of its own, built from its own policy, so
//! one batch can mix a full cache with H2O and windowed ones. The generation loop itself is
//! recompose-llm's `Batcher`: a step is one packed forward of a token for every decoding
//! request plus prompt chunks of the others, up to the token budget.

use crate::metrics::Metrics;
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::generate::{Batcher, FinishReason, GenerateOptions, SeqId, Sequence, TokenBudget, TokenLogprob};
use recompose_llm::kv::CacheLayout;
use recompose_llm::prefix::PrefixCache;
use recompose_llm::Model;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug)]
pub enum Event {
    /// New text (may be empty while a multi-byte character or a possible stop string is pending).
    Text {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens the prefix cache supplied.
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// A request as the scheduler sees it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub kv: KvSpec,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// A running request's channel and clocks (its tokens and cache live in the batcher).
struct Live {
    events: UnboundedSender<Event>,
    arrived: Instant,
    last_token_at: Instant,
}

pub struct EngineConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    /// Tokens per step (decode tokens plus prefill chunks).
    pub budget: TokenBudget,
    /// Bytes of KV kept for prompt prefixes that later requests share (None: no prefix cache).
    pub prefix_cache: Option<usize>,
    /// Called on the scheduler thread each time the batch empties (the binary hands freed memory
    /// back to the OS there).
    pub on_idle: Option<fn()>,
    /// Metrics of the model's side (an expert store's), rendered with the engine's.
    pub external_metrics: Vec<crate::metrics::External>,
    /// Which running requests a step takes (all of them, decode first, by default).
    pub policy: recompose_llm::generate::StepPolicy,
}

/// Handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
    pub context: usize,
}

impl Engine {
    /// Starts the scheduler thread.
    pub fn start(
        model: Model,
        tok: Arc<Tokenizer>,
        mut cfg: EngineConfig,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        // The channel is the queue: its bound is --max-queue; a full queue is a 429.
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.max_queue);
        let metrics = Arc::new(Metrics::default().with_external(std::mem::take(&mut cfg.external_metrics)));
        let draining = Arc::new(AtomicBool::new(false));
        let context = model.config.max_position;
        let queued = Arc::new(AtomicUsize::new(0));
        let (m, d, q) = (metrics.clone(), draining.clone(), queued.clone());
        let prefix = cfg
            .prefix_cache
            .map(PrefixCache::new)
            .transpose()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let handle = std::thread::Builder::new()
            .name("recompose-scheduler".into())
            .spawn(move || Scheduler::new(model, tok, cfg, m, d, q, prefix).run(rx))?;
        Ok((Self { tx, queued, metrics, draining, context }, handle))
    }

    /// Queues a job; Err when the queue is full or the server is shutting down (the job is
    /// dropped, which closes its event channel).
    pub fn submit(&self, job: Job) -> Result<(), Rejected> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Rejected);
        }
        // Counted before sending so the scheduler's decrement can never run first.
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Rejected
        })
    }
}

/// A job the queue did not take.
#[derive(Debug)]
pub struct Rejected;

struct Scheduler {
    model: Model,
    tok: Arc<Tokenizer>,
    layout: CacheLayout,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    /// Jobs queued in the channel (its bound is the queue limit).
    queued: Arc<AtomicUsize>,
    /// A job taken from the channel while the batch was full.
    waiting: Option<Job>,
    batch: Batcher,
    live: HashMap<SeqId, Live>,
    /// Work was done since the batch last emptied.
    worked: bool,
}

impl Scheduler {
    fn new(
        model: Model,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
        queued: Arc<AtomicUsize>,
        prefix: Option<PrefixCache>,
    ) -> Self {
        let layout = model.cache_layout();
        let mut batch = Batcher::new(cfg.budget).with_policy(cfg.policy);
        if let Some(pc) = prefix {
            batch = batch.with_prefix_cache(pc);
        }
        Self {
            model,
            tok,
            layout,
            cfg,
            metrics,
            draining,
            queued,
            waiting: None,
            batch,
            live: HashMap::new(),
            worked: false,
        }
    }

    fn busy(&self) -> bool {
        self.waiting.is_some() || !self.batch.is_empty()
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Idle: block for work (waking now and then to notice a shutdown).
            if !self.busy() {
                if std::mem::take(&mut self.worked) {
                    if let Some(f) = self.cfg.on_idle {
                        f();
                    }
                }
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(j) => {
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        self.waiting = Some(j);
                        self.worked = true;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if self.draining.load(Ordering::SeqCst) => return,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            self.drop_cancelled();
            self.admit(&rx);
            // A failed or panicking step fails the requests in it, never the server.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("generation failed: {e}")),
                Err(_) => Some("generation failed: internal error (see the server log)".to_string()),
            };
            if let Some(msg) = failure {
                tracing::error!("{msg}");
                self.batch.retain(|_| false);
                for (_, l) in self.live.drain() {
                    let _ = l.events.send(Event::Error(msg.clone()));
                }
            }
            let queued = self.queued.load(Ordering::SeqCst) + usize::from(self.waiting.is_some());
            let prefix = self.batch.prefix_cache().map_or(0, PrefixCache::bytes);
            self.metrics.state(queued, self.batch.len(), self.batch.decoding(), self.batch.resident_bytes(), prefix);
        }
    }

    /// Requests whose client went away are dropped with their caches.
    fn drop_cancelled(&mut self) {
        if self.waiting.as_ref().is_some_and(|j| j.events.is_closed()) {
            self.waiting = None;
        }
        let live = &mut self.live;
        for id in self.batch.retain(|id| live.get(&id).is_some_and(|l| !l.events.is_closed())) {
            live.remove(&id);
        }
    }

    /// Moves queued jobs into the batch while it has room; the rest stay in the bounded channel.
    fn admit(&mut self, rx: &mpsc::Receiver<Job>) {
        while self.batch.len() < self.cfg.max_batch {
            let job = match self.waiting.take() {
                Some(j) => j,
                None => match rx.try_recv() {
                    Ok(j) => {
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        j
                    }
                    Err(_) => break,
                },
            };
            if job.events.is_closed() {
                continue;
            }
            let cache = job.kv.build(&self.layout, &[job.prompt.len()]);
            let added = Sequence::new(job.prompt, job.opts, self.layout.max_len).and_then(|s| self.batch.add(s, cache));
            match added {
                Ok(id) => {
                    let now = Instant::now();
                    self.live.insert(id, Live { events: job.events, arrived: job.arrived, last_token_at: now });
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// One batched step; sends each request its new text, and ends the finished ones.
    fn step(&mut self) -> recompose_llm::Result<()> {
        let stepped = self.batch.step(&self.model, &self.tok)?;
        self.metrics.step(self.batch.last_step_tokens(), self.batch.last_step_experts());
        for s in stepped {
            let Some(live) = self.live.get_mut(&s.id) else { continue };
            let now = Instant::now();
            if s.first {
                self.metrics.ttft(now.duration_since(live.arrived).as_secs_f64());
            } else {
                self.metrics.itl(now.duration_since(live.last_token_at).as_secs_f64());
            }
            live.last_token_at = now;
            let _ = live.events.send(Event::Text { text: s.delta.text, logprob: s.delta.logprob });
            if let Some(finish) = s.delta.finish {
                if let (Some(l), Some((seq, _cache))) = (self.live.remove(&s.id), self.batch.remove(s.id)) {
                    let (prompt_tokens, cached_tokens) = (seq.prompt_tokens(), seq.cached_tokens());
                    let completion_tokens = seq.completion_tokens();
                    self.metrics.tokens(prompt_tokens, cached_tokens, completion_tokens);
                    let _ = l.events.send(Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens });
                }
            }
        }
        Ok(())
    }
}
