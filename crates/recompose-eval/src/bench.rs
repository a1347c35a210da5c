//! Speed and memory of one configuration: prefill tokens/s, time to first token, decode
//! tokens/s at a batch size, peak RSS and KV bytes. Warm-up first, then the median of runs.

use crate::error::{Error, Result};
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::generate::{Batcher, GenerateOptions, Sequence, TokenBudget, PREFILL_CHUNK};
use recompose_llm::Model;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub batch: usize,
    pub runs: usize,
    pub kv: KvSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub kv: String,
    pub threads: usize,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Prompt tokens (all rows) per second of prefill.
    pub prefill_tok_s: f64,
    /// Generated tokens (all rows) per second of decode steps.
    pub decode_tok_s: f64,
    pub ttft_ms: f64,
    pub kv_bytes: usize,
    pub peak_rss_mb: f64,
    pub runs: usize,
    /// Wall seconds of this configuration's warm-up and runs (for shares of its time).
    pub seconds: f64,
}

struct Run {
    /// Until every row had its first token: the prefill and the first sampling.
    ttft_s: f64,
    decode_s: f64,
    kv_bytes: usize,
}

fn one_run(model: &Model, tok: &Tokenizer, source: &[u32], o: &BenchOptions) -> Result<Run> {
    // Each row reads its own stretch of the source text, with a cache of its own: the loop a
    // server runs (recompose_llm::generate::Batcher), all rows' prompts in one packed step.
    let layout = model.cache_layout();
    let budget = PREFILL_CHUNK * o.batch;
    let mut batch = Batcher::new(TokenBudget { busy: budget, idle: budget });
    let opts = GenerateOptions { max_tokens: o.gen_tokens, ignore_eos: true, ..Default::default() };
    for b in 0..o.batch {
        let off = (b * 7) % source.len().saturating_sub(o.prompt_tokens).max(1);
        let row = source[off..off + o.prompt_tokens].to_vec();
        batch.add(
            Sequence::new(row, opts.clone(), model.config.max_position)?,
            o.kv.build(&layout, &[o.prompt_tokens]),
        )?;
    }
    let t0 = Instant::now();
    while batch.decoding() < o.batch {
        batch.step(model, tok)?;
    }
    let ttft_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut done = 0;
    while done < o.batch {
        done += batch.step(model, tok)?.iter().filter(|s| s.delta.finish.is_some()).count();
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Run { ttft_s, decode_s, kv_bytes: batch.resident_bytes() })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Benchmarks `model` on prompts cut from `source` (token ids of a long text).
pub fn run(model: &Model, tok: &Tokenizer, source: &[u32], o: &BenchOptions) -> Result<BenchResult> {
    let mut r = compare(&[model], tok, source, o)?;
    r.pop().ok_or_else(|| Error::Invalid("no result".into()))
}

/// Benchmarks several models (a dense model and the MoE cut from it) on the same prompts with
/// their timed runs interleaved, run `i` of every model back to back, so a machine whose speed
/// drifts between runs slows them alike. One result per model, in order.
pub fn compare(models: &[&Model], tok: &Tokenizer, source: &[u32], o: &BenchOptions) -> Result<Vec<BenchResult>> {
    if o.batch == 0 || o.runs == 0 || o.gen_tokens < 2 || o.prompt_tokens == 0 {
        return Err(Error::Invalid("batch, runs and prompt tokens must be >= 1, generated tokens >= 2".into()));
    }
    if source.len() < o.prompt_tokens {
        return Err(Error::Invalid(format!(
            "the source text has {} tokens, fewer than the {} asked",
            source.len(),
            o.prompt_tokens
        )));
    }
    let mut seconds = vec![0f64; models.len()];
    for (model, secs) in models.iter().zip(seconds.iter_mut()) {
        if o.prompt_tokens + o.gen_tokens > model.config.max_position {
            return Err(recompose_llm::Error::ContextOverflow {
                tokens: o.prompt_tokens + o.gen_tokens,
                context: model.config.max_position,
            }
            .into());
        }
        // Warm-up: pages the weights in and fills allocator pools (a short prompt: long ones
        // would only repeat the prefill).
        let warm = BenchOptions {
            gen_tokens: 4.min(o.gen_tokens),
            runs: 1,
            prompt_tokens: o.prompt_tokens.min(128),
            ..o.clone()
        };
        let t0 = Instant::now();
        one_run(model, tok, source, &warm)?;
        *secs += t0.elapsed().as_secs_f64();
    }
    let mut runs: Vec<Vec<Run>> = models.iter().map(|_| vec![]).collect();
    for _ in 0..o.runs {
        for ((model, r), secs) in models.iter().zip(runs.iter_mut()).zip(seconds.iter_mut()) {
            let t0 = Instant::now();
            r.push(one_run(model, tok, source, o)?);
            *secs += t0.elapsed().as_secs_f64();
        }
    }
    let steps = (o.gen_tokens - 1) * o.batch;
    Ok(runs
        .into_iter()
        .zip(seconds)
        .map(|(runs, seconds)| BenchResult {
            kv: o.kv.to_string(),
            threads: rayon_threads(),
            batch: o.batch,
            prompt_tokens: o.prompt_tokens,
            gen_tokens: o.gen_tokens,
            prefill_tok_s: median(runs.iter().map(|r| (o.prompt_tokens * o.batch) as f64 / r.ttft_s).collect()),
            decode_tok_s: median(runs.iter().map(|r| steps as f64 / r.decode_s).collect()),
            ttft_ms: median(runs.iter().map(|r| r.ttft_s * 1e3).collect()),
            kv_bytes: runs.last().map(|r| r.kv_bytes).unwrap_or(0),
            peak_rss_mb: peak_rss_bytes() as f64 / (1024.0 * 1024.0),
            runs: o.runs,
            seconds,
        })
        .collect())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Peak resident memory of this process (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// Resident memory of this process now (Linux `VmRSS`; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
