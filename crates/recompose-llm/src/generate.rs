//! Generation, written once: a [`Sequence`] is one request's state (prompt, sampler, penalties,
//! stop strings, incremental detokenising, finish reason); a [`Batcher`] steps many sequences,
//! each with its own KV cache, mixing prefill chunks and decode tokens under a per-step token
//! budget. `recompose generate`, the evaluations and the server all run this loop.

use crate::error::{Error, Result};
use crate::kv::{FullCache, KvCache};
use crate::model::{Logits, Model};
use crate::prefix::PrefixCache;
use crate::sample::{Sampler, SamplingParams};
use recompose_core::tokenizer::{TextStream, Tokenizer};
use std::collections::HashMap;
use std::time::Instant;

/// Prompt columns per prefill step when nothing else runs: keeps attention buffers small on
/// long prompts.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// OpenAI penalties, over the generated tokens: subtracted once per token present, and
    /// once per occurrence.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    /// Some(n): report each chosen token's log-probability and the n most likely.
    pub logprobs: Option<usize>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: vec![],
            logprobs: None,
            ignore_eos: false,
        }
    }
}

impl GenerateOptions {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.sampling.validate()?;
        for (name, v) in [("presence", self.presence_penalty), ("frequency", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} penalty must be in [-2, 2], got {v}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

impl FinishReason {
    /// The OpenAI name: an end-of-sequence token and a stop string are both "stop".
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What one sampled token adds to a sequence's output.
#[derive(Debug, Clone)]
pub struct Delta {
    /// New text: empty while a multi-byte character or a possible stop string is pending.
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Set on the sequence's last token.
    pub finish: Option<FinishReason>,
}

/// One request's generation state. Feed it to a model with [`Sequence::pending`] and
/// [`Sequence::fed`]; once everything it holds is in the cache, hand the last logits to
/// [`Sequence::accept`], which samples the next token.
pub struct Sequence {
    opts: GenerateOptions,
    sampler: Sampler,
    /// Prompt and generated tokens: the repetition penalty's context, and what gets fed.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens of `tokens` already in the cache.
    fed: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    context: usize,
    /// Generated tokens, the EOS that ended the sequence included.
    sampled: usize,
    /// Generated tokens per id (presence and frequency penalties).
    counts: HashMap<u32, usize>,
    stream: TextStream,
    text: String,
    /// Bytes of `text` handed out so far.
    emitted: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// A sequence for `prompt` on a model of `context` positions.
    pub fn new(prompt: Vec<u32>, opts: GenerateOptions, context: usize) -> Result<Self> {
        opts.validate().map_err(Error::InvalidInput)?;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("every prompt needs at least one token".into()));
        }
        if prompt.len() + 1 > context {
            return Err(Error::ContextOverflow { tokens: prompt.len(), context });
        }
        let finish = (opts.max_tokens == 0).then_some(FinishReason::Length);
        Ok(Self {
            sampler: Sampler::new(opts.sampling.clone()),
            opts,
            prompt_len: prompt.len(),
            tokens: prompt,
            fed: 0,
            cached: 0,
            context,
            sampled: 0,
            counts: HashMap::new(),
            stream: TextStream::new(),
            text: String::new(),
            emitted: 0,
            finish,
        })
    }

    /// Tokens not yet in the cache: the rest of the prompt, or the last sampled token.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.fed..]
    }

    /// Whether prompt tokens are still to be fed.
    pub fn prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    /// Marks `n` more pending tokens as in the cache.
    pub fn fed(&mut self, n: usize) {
        self.fed = (self.fed + n).min(self.tokens.len());
    }

    /// Tokens in the cache.
    pub fn position(&self) -> usize {
        self.fed
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The prompt, then every sampled token (the last one pending until it is fed).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    /// Prompt tokens that came from the prefix cache instead of being prefilled.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// Generated tokens, the EOS that ended the sequence not counted.
    pub fn completion_tokens(&self) -> usize {
        self.sampled - usize::from(self.finish == Some(FinishReason::Eos))
    }

    /// Generated token ids (without a final EOS).
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..self.prompt_len + self.completion_tokens()]
    }

    /// The text so far (cut at a stop string once one appeared).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Samples the next token from the logits of the last token fed, and returns the text that
    /// is now safe to show.
    pub fn accept(&mut self, tok: &Tokenizer, logits: &mut [f32]) -> Result<Delta> {
        if self.finish.is_some() || self.fed != self.tokens.len() {
            return Err(Error::InvalidInput("accept needs a live sequence with everything fed".into()));
        }
        let lp = self.opts.logprobs.map(|_| log_softmax(logits));
        if self.opts.presence_penalty != 0.0 || self.opts.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.opts.presence_penalty + self.opts.frequency_penalty * n as f32;
                }
            }
        }
        let id = self.sampler.sample(logits, &self.tokens);
        self.tokens.push(id);
        self.sampled += 1;
        *self.counts.entry(id).or_default() += 1;
        let eos = !self.opts.ignore_eos && tok.eos.contains(&id);
        if !eos {
            self.text.push_str(&self.stream.push(tok, id)?);
        }
        let logprob = lp.map(|lp| top_logprobs(tok, &lp, id, self.opts.logprobs.unwrap_or(0)));
        let stop_at = self.opts.stop.iter().filter_map(|s| self.text.find(s.as_str())).min();
        self.finish = if eos {
            Some(FinishReason::Eos)
        } else if stop_at.is_some() {
            Some(FinishReason::Stop)
        } else if self.sampled >= self.opts.max_tokens || self.tokens.len() >= self.context {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(cut) = stop_at {
            self.text.truncate(cut);
        }
        // While running, hold back a tail that could still become a stop string.
        let mut end = self.text.len();
        if self.finish.is_none() {
            for st in &self.opts.stop {
                if let Some(k) = (1..st.len()).rev().find(|&k| st.is_char_boundary(k) && self.text.ends_with(&st[..k]))
                {
                    end = end.min(self.text.len() - k);
                }
            }
        }
        let text = self.text.get(self.emitted.min(end)..end).unwrap_or_default().to_string();
        self.emitted = self.emitted.max(end);
        Ok(Delta { text, logprob, finish: self.finish })
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    logits.iter().map(|l| l - lse).collect()
}

fn top_logprobs(tok: &Tokenizer, lp: &[f32], id: u32, n: usize) -> TokenLogprob {
    let name = |t: u32| tok.decode(&[t], false).unwrap_or_default();
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    let n = n.min(lp.len());
    if n > 0 {
        idx.select_nth_unstable_by(n - 1, |a, b| lp[*b].total_cmp(&lp[*a]));
        idx.truncate(n);
        idx.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
    } else {
        idx.clear();
    }
    TokenLogprob {
        token: name(id),
        logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: idx.into_iter().map(|i| (name(i as u32), lp[i])).collect(),
    }
}

/// Tokens per step: decode rows take one each, prefill chunks fill the rest.
#[derive(Debug, Clone, Copy)]
pub struct TokenBudget {
    /// While some sequence decodes: every step waits for its prefill tokens, so this bounds
    /// the inter-token latency that new arrivals add.
    pub busy: usize,
    /// While every sequence is still prefilling: a large chunk gives a fast first token.
    pub idle: usize,
}

impl Default for TokenBudget {
    fn default() -> Self {
        Self { busy: 64, idle: PREFILL_CHUNK }
    }
}

/// Identifies a sequence in a [`Batcher`].
pub type SeqId = u64;

struct Row {
    id: SeqId,
    seq: Sequence,
    cache: Box<dyn KvCache>,
    /// Steps it was ready and not taken (expert-aware batching bounds it).
    waited: usize,
    /// The router run ahead of the backbone (see [`Batcher::with_policy`]).
    ahead: Option<Ahead>,
}

/// A sequence's router, run ahead: its own cache (the router's layer only) and the experts of
/// the tokens it routed that the backbone has not run yet.
struct Ahead {
    cache: FullCache,
    routes: std::collections::VecDeque<u32>,
}

/// How a step chooses its sequences when it may take fewer than are ready.
#[derive(Debug, Clone, Copy)]
pub struct StepPolicy {
    pub batching: crate::batching::Batching,
    /// Sequences per step (the rest wait; usize::MAX: every ready one).
    pub max_rows: usize,
    /// Steps a sequence may be passed over by expert-aware batching before it must run.
    pub max_wait: usize,
}

impl Default for StepPolicy {
    fn default() -> Self {
        Self { batching: crate::batching::Batching::DecodeFirst, max_rows: usize::MAX, max_wait: 16 }
    }
}

/// What one step did to one sequence.
pub struct Stepped {
    pub id: SeqId,
    pub delta: Delta,
    /// Whether this was the sequence's first token.
    pub first: bool,
}

/// Continuous batching over sequences that each own a cache of batch 1 (so one batch can mix
/// KV policies). A step is one packed forward: one token for every decoding sequence, and
/// prompt chunks, oldest sequence first, up to the token budget.
#[derive(Default)]
pub struct Batcher {
    rows: Vec<Row>,
    next_id: SeqId,
    pub budget: TokenBudget,
    pub policy: StepPolicy,
    last_tokens: usize,
    last_experts: usize,
    prefix: Option<PrefixCache>,
}

impl Batcher {
    pub fn new(budget: TokenBudget) -> Self {
        Self { budget, ..Self::default() }
    }

    /// Chooses each step's sequences by `policy` (every ready one, decode first, by default).
    /// With a pre-gated MoE and a step smaller than the running batch (or expert-aware
    /// batching, which needs the router), every sequence is routed ahead of the backbone, so a
    /// step knows the expert of each candidate's next token.
    pub fn with_policy(mut self, policy: StepPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Shares prompt prefixes between sequences through `cache` (see [`PrefixCache`]).
    pub fn with_prefix_cache(mut self, cache: PrefixCache) -> Self {
        self.prefix = Some(cache);
        self
    }

    pub fn prefix_cache(&self) -> Option<&PrefixCache> {
        self.prefix.as_ref()
    }

    /// Adds a sequence; its cache must be empty or hold exactly the tokens marked fed. A fresh
    /// sequence whose policy can share starts from the longest cached prefix of its prompt.
    pub fn add(&mut self, mut seq: Sequence, mut cache: Box<dyn KvCache>) -> Result<SeqId> {
        if let (Some(pc), 0, 0) = (self.prefix.as_mut(), seq.position(), cache.seq_len(0)) {
            if let Some((n, kv)) = pc.lookup(seq.prompt())? {
                if cache.import_prefix(&kv)? {
                    seq.fed(n);
                    seq.cached = n;
                }
            }
        }
        if cache.batch_size() != 1 || cache.seq_len(0) != seq.position() {
            return Err(Error::InvalidInput(format!(
                "a sequence at position {} needs a batch-1 cache holding as many tokens, not {} rows holding {}",
                seq.position(),
                cache.batch_size(),
                cache.seq_len(0)
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.rows.push(Row { id, seq, cache, waited: 0, ahead: None });
        Ok(id)
    }

    /// Takes a sequence out (finished, cancelled or failed) with its cache.
    ///
    /// Its prompt went to the prefix cache when its prefill ended; its generated tokens do not:
    /// their KV came from the decode kernel, which differs in the last bits from the prefill
    /// kernel a later prompt holding them runs, so the next turn of a chat reuses the previous
    /// turn's prompt and prefills the reply again, to give exactly what it gives uncached.
    pub fn remove(&mut self, id: SeqId) -> Option<(Sequence, Box<dyn KvCache>)> {
        let i = self.rows.iter().position(|r| r.id == id)?;
        let r = self.rows.remove(i);
        Some((r.seq, r.cache))
    }

    /// Keeps the sequences `keep` accepts; returns the ids of the others, removed.
    pub fn retain(&mut self, mut keep: impl FnMut(SeqId) -> bool) -> Vec<SeqId> {
        let mut gone = vec![];
        self.rows.retain(|r| {
            let k = keep(r.id);
            if !k {
                gone.push(r.id);
            }
            k
        });
        gone
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Sequences past their prompt.
    pub fn decoding(&self) -> usize {
        self.rows.iter().filter(|r| !r.seq.prefilling()).count()
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.rows.iter().find(|r| r.id == id).map(|r| &r.seq)
    }

    /// Tokens the last step fed (decode tokens plus prefill chunks).
    pub fn last_step_tokens(&self) -> usize {
        self.last_tokens
    }

    /// Distinct experts the last step's tokens were routed to (0 unless routed ahead).
    pub fn last_step_experts(&self) -> usize {
        self.last_experts
    }

    /// Routes every live sequence's tokens the backbone has not run, through its own router
    /// cache (made at its first step: the router reads the whole prompt, a prefix cached for
    /// the backbone included).
    fn route_ahead(&mut self, model: &Model) -> Result<()> {
        for r in self.rows.iter_mut().filter(|r| r.seq.finish().is_none()) {
            let a = r.ahead.get_or_insert_with(|| Ahead {
                cache: FullCache::new(model.cache_layers(), 1, model.config.max_position).on(model.device()),
                routes: Default::default(),
            });
            let routed = a.cache.seq_len(0);
            let all = r.seq.tokens();
            if routed < all.len() {
                let new = model.route_ahead(&all[routed..], &mut a.cache)?;
                // Keep the routes from the backbone's position on.
                let skip = r.seq.position().saturating_sub(routed);
                a.routes.extend(new.into_iter().skip(skip));
            }
        }
        Ok(())
    }

    /// The experts of the steps after this one, as far as the routes run ahead tell: this
    /// step's prompt rows' next chunks in the next step, then the sequences passed over, in rank
    /// order, `max_rows` to a step. (A decoding row's next token is not sampled yet.)
    fn upcoming(&self, ready: &[usize], order: &[usize], take: &[(usize, usize)]) -> Vec<Vec<u32>> {
        let rows = self.policy.max_rows.max(1);
        let chunk = self.budget.busy.max(1);
        let next = |i: usize, skip: usize| -> Vec<u32> {
            let r = &self.rows[i];
            let n = if r.seq.prefilling() { chunk } else { 1 };
            r.ahead.as_ref().map_or(vec![], |a| a.routes.iter().skip(skip).take(n).copied().collect())
        };
        let mut steps: Vec<Vec<u32>> = vec![vec![]];
        for &(i, n) in take {
            if self.rows[i].seq.prefilling() {
                steps[0].extend(next(i, n));
            }
        }
        let passed: Vec<usize> = order.iter().map(|&k| ready[k]).filter(|i| !take.iter().any(|t| t.0 == *i)).collect();
        for (p, &i) in passed.iter().enumerate() {
            let s = p / rows;
            if steps.len() <= s {
                steps.push(vec![]);
            }
            steps[s].extend(next(i, 0));
        }
        for s in &mut steps {
            s.sort_unstable();
            s.dedup();
        }
        steps
    }

    /// Bytes of KV storage the sequences hold.
    pub fn resident_bytes(&self) -> usize {
        self.rows.iter().map(|r| r.cache.resident_bytes()).sum()
    }

    /// Runs one step. Finished sequences stay in until removed (see [`Batcher::remove`]); they
    /// take no part in later steps. On an error no sequence has advanced... except in its
    /// cache: callers fail the sequences of a failed step.
    pub fn step(&mut self, model: &Model, tok: &Tokenizer) -> Result<Vec<Stepped>> {
        let expert = self.policy.batching == crate::batching::Batching::ExpertAware;
        if expert && model.pregate().is_none() {
            return Err(Error::InvalidInput("expert-aware batching needs a pre-gated MoE (a router)".into()));
        }
        // A MoE whose steps choose among the running sequences routes them ahead under every
        // batching policy, so the policies compare on equal terms (and report their experts).
        let ahead = model.pregate().is_some() && (expert || self.policy.max_rows != usize::MAX);
        if ahead {
            self.route_ahead(model)?;
        }
        let live = |r: &Row| r.seq.finish().is_none();
        let ready: Vec<usize> = (0..self.rows.len()).filter(|&i| live(&self.rows[i])).collect();
        let candidates: Vec<crate::batching::Candidate> = ready
            .iter()
            .map(|&i| {
                let r = &self.rows[i];
                let expert = r.ahead.as_ref().and_then(|a| a.routes.front().copied()).unwrap_or(0);
                crate::batching::Candidate { decoding: !r.seq.prefilling(), waited: r.waited, expert }
            })
            .collect();
        let order = crate::batching::rank(&candidates, self.policy.batching, self.policy.max_wait);
        let max_rows = self.policy.max_rows.max(1);
        let decoding = candidates.iter().filter(|c| c.decoding).count().min(max_rows);
        let mut left = if decoding > 0 { self.budget.busy.max(decoding) } else { self.budget.idle };
        // Which rows take part and how many tokens each brings: in rank order, up to the
        // step's rows and tokens (a decoding row always fits: the budget covers them).
        let mut take: Vec<(usize, usize)> = vec![];
        for &k in &order {
            if take.len() == max_rows || left == 0 {
                break;
            }
            let r = &self.rows[ready[k]];
            let n = if r.seq.prefilling() {
                let most = r.cache.prefill_chunk().unwrap_or(usize::MAX).min(left);
                r.seq.pending().len().min(most)
            } else {
                1
            };
            take.push((ready[k], n));
            left -= n;
        }
        self.last_tokens = take.iter().map(|t| t.1).sum();
        if take.is_empty() {
            return Ok(vec![]);
        }
        take.sort_unstable();
        for &i in &ready {
            let r = &mut self.rows[i];
            r.waited = if take.iter().any(|t| t.0 == i) { 0 } else { r.waited + 1 };
        }
        let routes: Option<Vec<u32>> = ahead.then(|| {
            take.iter()
                .flat_map(|&(i, n)| self.rows[i].ahead.as_ref().map(|a| a.routes.iter().take(n).copied()))
                .flatten()
                .collect()
        });
        if ahead {
            model.upcoming(&self.upcoming(&ready, &order, &take));
        }
        self.last_experts = routes.as_ref().map_or(0, |r| {
            let mut distinct = r.clone();
            distinct.sort_unstable();
            distinct.dedup();
            distinct.len()
        });
        let mut tokens = Vec::with_capacity(take.iter().map(|t| t.1).sum());
        let (mut start, mut lens, mut prompt) = (vec![], vec![], vec![]);
        for &(i, n) in &take {
            tokens.extend_from_slice(&self.rows[i].seq.pending()[..n]);
            start.push(self.rows[i].seq.position());
            lens.push(n);
            prompt.push(self.rows[i].seq.prefilling());
        }
        let logits = {
            // `take` is sorted by row, so the taking rows' caches come out in its order.
            let mut takes = vec![false; self.rows.len()];
            take.iter().for_each(|&(i, _)| takes[i] = true);
            let mut caches: Vec<&mut dyn KvCache> = self
                .rows
                .iter_mut()
                .zip(&takes)
                .filter(|(_, &t)| t)
                .map(|(r, _)| -> &mut dyn KvCache { r.cache.as_mut() })
                .collect();
            model.forward_packed_routed(&tokens, &start, &lens, &prompt, &mut caches, Logits::Last, routes)?
        };
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut out = vec![];
        for (&(i, n), mut l) in take.iter().zip(logits) {
            let r = &mut self.rows[i];
            let was_prefilling = r.seq.prefilling();
            r.seq.fed(n);
            if let Some(a) = r.ahead.as_mut() {
                a.routes.drain(..n.min(a.routes.len()));
            }
            if was_prefilling && !r.seq.prefilling() {
                r.cache.end_prefill()?;
                if let Some(pc) = self.prefix.as_mut() {
                    if let Some(kv) = r.cache.export_prefix(r.seq.prompt_tokens()) {
                        pc.insert(r.seq.prompt(), kv?);
                    }
                }
            }
            if r.seq.pending().is_empty() {
                let first = r.seq.sampled == 0;
                out.push(Stepped { id: r.id, delta: r.seq.accept(tok, &mut l)?, first });
            }
        }
        Ok(out)
    }
}

/// One finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// KV bytes the sequence's cache held at the end.
    pub kv_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Until every sequence had its first token.
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub prefill_tokens: usize,
    /// Sampled tokens (a final EOS included).
    pub decode_tokens: usize,
}

/// Generates for prompts, each with its own cache from `cache_for(prompt length)` and its own
/// sampler (seeded `seed + row`). `on_text(row, text)` receives each row's new text as it is
/// safe to show (never a piece of a stop string).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut cache_for: impl FnMut(usize) -> Box<dyn KvCache>,
    mut on_text: impl FnMut(usize, &str),
) -> Result<(Vec<Generation>, Timings)> {
    if prompts.is_empty() {
        return Err(Error::InvalidInput("no prompts".into()));
    }
    let ctx = model.config.max_position;
    // All rows prefill at once with the whole budget (a batch job, not a server).
    let mut batch =
        Batcher::new(TokenBudget { busy: PREFILL_CHUNK * prompts.len(), idle: PREFILL_CHUNK * prompts.len() });
    let mut ids = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let mut o = opts.clone();
        o.sampling.seed = opts.sampling.seed.wrapping_add(i as u64);
        ids.push(batch.add(Sequence::new(p.clone(), o, ctx)?, cache_for(p.len()))?);
    }
    let mut timings = Timings { prefill_tokens: prompts.iter().map(Vec::len).sum(), ..Default::default() };
    let (t0, mut first_all) = (Instant::now(), None);
    // A sequence with nothing to generate is finished from the start.
    let mut done = ids.iter().filter(|&&id| batch.get(id).is_some_and(|s| s.finish().is_some())).count();
    while done < prompts.len() {
        for s in batch.step(model, tok)? {
            let row = ids.iter().position(|&i| i == s.id).unwrap_or(0);
            timings.decode_tokens += 1;
            if !s.delta.text.is_empty() {
                on_text(row, &s.delta.text);
            }
            done += usize::from(s.delta.finish.is_some());
        }
        if first_all.is_none() && batch.decoding() == prompts.len() {
            first_all = Some(Instant::now());
        }
    }
    let first_all = first_all.unwrap_or_else(Instant::now);
    timings.prefill_secs = first_all.duration_since(t0).as_secs_f64();
    timings.decode_secs = first_all.elapsed().as_secs_f64();
    let gens = ids
        .into_iter()
        .map(|id| {
            let (seq, cache) = batch.remove(id).ok_or_else(|| Error::InvalidInput("sequence lost".into()))?;
            Ok(Generation {
                tokens: seq.generated().to_vec(),
                text: seq.text().to_string(),
                finish: seq.finish().unwrap_or(FinishReason::Length),
                prompt_tokens: seq.prompt_tokens(),
                kv_bytes: cache.resident_bytes(),
            })
        })
        .collect::<Result<_>>()?;
    Ok((gens, timings))
}
