//! The scheduler: one thread owns the model and runs continuous batching. Requests wait in a
//! bounded queue, join the running batch at a token boundary, and leave it when they finish or
//! their client goes away. Each request has a KV cache of its own, built from its own policy, so
//! one batch can mix a full cache with H2O and windowed ones (`Model::forward_rows`). A step
//! is one chunk of one waiting prompt (at most `PREFILL_CHUNK_BUSY` tokens while others stream,
//! so running streams keep flowing), then one decode token for every running request.

use crate::metrics::Metrics;
use recompose_core::tokenizer::TextStream;
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::kv::{CacheLayout, KvCache, Step};
use recompose_llm::sample::{Sampler, SamplingParams};
use recompose_llm::{Logits, Model};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Longest piece of a prompt prefilled in one step: large while nothing else runs (fast first
/// token), small while other requests stream (each decode step waits for the chunk).
pub const PREFILL_CHUNK_IDLE: usize = 512;
pub const PREFILL_CHUNK_BUSY: usize = 64;

/// One token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// New text (may be empty while a multi-byte character or a possible stop string is pending).
    Text {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// A request as the scheduler sees it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    /// Some(n): report the chosen token's logprob and the n most likely.
    pub logprobs: Option<usize>,
    pub kv: KvSpec,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

struct Seq {
    job: Job,
    cache: Box<dyn KvCache>,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// Text decoded so far.
    text: String,
    stream: TextStream,
    emitted: usize,
    last_token_at: Instant,
}

pub struct EngineConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    /// Called on the scheduler thread each time the batch empties (the binary hands freed memory
    /// back to the OS there).
    pub on_idle: Option<fn()>,
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
        cfg: EngineConfig,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        // The channel is the queue: its bound is --max-queue; a full queue is a 429.
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.max_queue);
        let metrics = Arc::new(Metrics::default());
        let draining = Arc::new(AtomicBool::new(false));
        let context = model.config.max_position;
        let queued = Arc::new(AtomicUsize::new(0));
        let (m, d, q) = (metrics.clone(), draining.clone(), queued.clone());
        let handle = std::thread::Builder::new()
            .name("recompose-scheduler".into())
            .spawn(move || Scheduler::new(model, tok, cfg, m, d, q).run(rx))?;
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
    prefilling: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Work was done since the batch last emptied.
    worked: bool,
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    logits.iter().map(|l| l - lse).collect()
}

impl Scheduler {
    fn new(
        model: Model,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        let layout = model.cache_layout();
        Self {
            model,
            tok,
            layout,
            cfg,
            metrics,
            draining,
            queued,
            waiting: None,
            prefilling: VecDeque::new(),
            running: vec![],
            worked: false,
        }
    }

    fn busy(&self) -> bool {
        self.waiting.is_some() || !self.prefilling.is_empty() || !self.running.is_empty()
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
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Err(e) = self.prefill_one() {
                    tracing::error!("prefill failed: {e}");
                }
                self.decode()
            }));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("generation failed: {e}")),
                Err(_) => Some("generation failed: internal error (see the server log)".to_string()),
            };
            if let Some(msg) = failure {
                tracing::error!("{msg}");
                for s in self.running.drain(..).chain(self.prefilling.drain(..)) {
                    let _ = s.job.events.send(Event::Error(msg.clone()));
                }
            }
            let kv: usize = self.running.iter().chain(&self.prefilling).map(|s| s.cache.resident_bytes()).sum();
            let active = self.running.len() + self.prefilling.len();
            self.metrics.state(self.queued.load(Ordering::SeqCst), active, self.running.len(), kv);
        }
    }

    /// Requests whose client went away are dropped with their caches.
    fn drop_cancelled(&mut self) {
        if self.waiting.as_ref().is_some_and(|j| j.events.is_closed()) {
            self.waiting = None;
        }
        self.prefilling.retain(|s| !s.job.events.is_closed());
        self.running.retain(|s| !s.job.events.is_closed());
    }

    /// Moves queued jobs into the batch while it has room; the rest stay in the bounded channel.
    fn admit(&mut self, rx: &mpsc::Receiver<Job>) {
        while self.running.len() + self.prefilling.len() < self.cfg.max_batch {
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
            let sampler = Sampler::new(job.sampling.clone());
            let now = Instant::now();
            self.prefilling.push_back(Seq {
                job,
                cache,
                fed: 0,
                generated: vec![],
                sampler,
                text: String::new(),
                stream: TextStream::new(),
                emitted: 0,
                last_token_at: now,
            });
        }
    }

    fn prefill_one(&mut self) -> recompose_llm::Result<()> {
        let Some(mut s) = self.prefilling.pop_front() else { return Ok(()) };
        let most = if self.running.is_empty() { PREFILL_CHUNK_IDLE } else { PREFILL_CHUNK_BUSY };
        let chunk = s.cache.prefill_chunk().unwrap_or(most).min(most);
        let end = (s.fed + chunk).min(s.job.prompt.len());
        let piece = &s.job.prompt[s.fed..end];
        let step = Step { start: vec![s.fed], lens: vec![piece.len()], t: piece.len() };
        let logits = match self.model.forward(piece, &step, s.cache.as_mut(), Logits::Last) {
            Ok(l) => l,
            Err(e) => {
                let _ = s.job.events.send(Event::Error(format!("prefill failed: {e}")));
                return Err(e);
            }
        };
        s.fed = end;
        if s.fed < s.job.prompt.len() {
            self.prefilling.push_front(s);
            return Ok(());
        }
        s.cache.end_prefill()?;
        let mut l: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        self.metrics.ttft(s.job.arrived.elapsed().as_secs_f64());
        if !self.emit(&mut s, &mut l) {
            self.running.push(s);
        }
        Ok(())
    }

    fn decode(&mut self) -> recompose_llm::Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        let tokens: Vec<u32> = self.running.iter().map(|s| *s.generated.last().unwrap_or(&0)).collect();
        let start: Vec<usize> = self.running.iter().map(|s| s.cache.seq_len(0)).collect();
        let step = Step { start, lens: vec![1; tokens.len()], t: 1 };
        let mut caches: Vec<&mut dyn KvCache> =
            self.running.iter_mut().map(|s| s.cache.as_mut() as &mut dyn KvCache).collect();
        let logits: Vec<Vec<f32>> = self.model.forward_rows(&tokens, &step, &mut caches, Logits::Last)?.to_vec2()?;
        let mut keep = Vec::with_capacity(self.running.len());
        let running = std::mem::take(&mut self.running);
        for (mut s, mut l) in running.into_iter().zip(logits) {
            let now = Instant::now();
            self.metrics.itl(now.duration_since(s.last_token_at).as_secs_f64());
            s.last_token_at = now;
            if !self.emit(&mut s, &mut l) {
                keep.push(s);
            }
        }
        self.running = keep;
        Ok(())
    }

    /// Samples the next token from `logits`, sends its text; true when the request is finished.
    fn emit(&self, s: &mut Seq, logits: &mut [f32]) -> bool {
        let lp = s.job.logprobs.map(|_| log_softmax(logits));
        if s.job.presence_penalty != 0.0 || s.job.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, usize>::new();
            s.generated.iter().for_each(|t| *counts.entry(*t).or_default() += 1);
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= s.job.presence_penalty + s.job.frequency_penalty * n as f32;
                }
            }
        }
        let token = s.sampler.sample(logits, &s.generated);
        s.generated.push(token);
        let eos = self.tok.eos.contains(&token);
        if !eos {
            // Decoded as `recompose generate` decodes: a piece once it ends in a whole character.
            s.text.push_str(&s.stream.push(&self.tok, token).unwrap_or_default());
        }
        let logprob = lp.map(|lp| {
            let name = |t: u32| self.tok.decode(&[t], false).unwrap_or_default();
            let n = s.job.logprobs.unwrap_or(0);
            let mut idx: Vec<usize> = (0..lp.len()).collect();
            if n > 0 {
                idx.select_nth_unstable_by(n.min(lp.len()) - 1, |a, b| lp[*b].total_cmp(&lp[*a]));
                idx.truncate(n.min(lp.len()));
                idx.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
            } else {
                idx.clear();
            }
            TokenLogprob {
                token: name(token),
                logprob: lp[token as usize],
                top: idx.into_iter().map(|i| (name(i as u32), lp[i])).collect(),
            }
        });
        // Stop strings: cut at the first one; otherwise hold back a tail that could still
        // become one.
        let stop_at = s.job.stop.iter().filter_map(|st| s.text.find(st.as_str())).min();
        let at_context = s.cache.seq_len(0) + 1 >= self.layout.max_len;
        let finish = if stop_at.is_some() || eos {
            Some(Finish::Stop)
        } else if s.generated.len() >= s.job.max_tokens || at_context {
            Some(Finish::Length)
        } else {
            None
        };
        let mut end = stop_at.unwrap_or(s.text.len());
        if finish.is_none() {
            for st in &s.job.stop {
                if let Some(k) = (1..st.len()).rev().find(|&k| st.is_char_boundary(k) && s.text.ends_with(&st[..k])) {
                    end = end.min(s.text.len() - k);
                }
            }
            while end > s.emitted && !s.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        let new = s.text.get(s.emitted..end).unwrap_or_default().to_string();
        s.emitted = s.emitted.max(end);
        let counted = s.generated.len() - usize::from(eos);
        let _ = s.job.events.send(Event::Text { text: new, logprob });
        if let Some(f) = finish {
            self.metrics.tokens(s.job.prompt.len(), counted);
            let _ = s.job.events.send(Event::Done {
                finish: f,
                prompt_tokens: s.job.prompt.len(),
                completion_tokens: counted,
            });
            return true;
        }
        false
    }
}
