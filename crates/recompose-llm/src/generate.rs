//! Generation loops: prefill the prompts as one batched step, then decode one token per row per
//! step until EOS, a stop string or the token limit. Streams text through a callback.

use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::model::{step_for, Logits, Model};
use crate::sample::{Sampler, SamplingParams};
use recompose_core::tokenizer::{TextStream, Tokenizer};
use std::time::Instant;

/// Prompt columns per prefill step: keeps attention buffers small on long prompts.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 128, sampling: SamplingParams::default(), stop: vec![], ignore_eos: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
}

/// Generates for a batch of prompts (each its own sampler, seeded `seed + row`).
/// `on_text(row, text)` receives each row's new text as it is decoded.
pub fn generate_batch(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    cache: &mut dyn KvCache,
    mut on_text: impl FnMut(usize, &str),
) -> Result<(Vec<Generation>, Timings)> {
    opts.sampling.validate().map_err(Error::InvalidInput)?;
    let n = prompts.len();
    if n == 0 || prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::InvalidInput("every prompt needs at least one token".into()));
    }
    let ctx = model.config.max_position;
    for p in prompts {
        if p.len() + 1 > ctx {
            return Err(Error::ContextOverflow { tokens: p.len(), context: ctx });
        }
    }
    let max_new = opts.max_tokens.min(ctx - prompts.iter().map(Vec::len).max().unwrap_or(0));
    let mut samplers: Vec<Sampler> = (0..n)
        .map(|i| {
            Sampler::new(SamplingParams { seed: opts.sampling.seed.wrapping_add(i as u64), ..opts.sampling.clone() })
        })
        .collect();
    let mut streams: Vec<TextStream> = vec![TextStream::new(); n];
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![vec![]; n];
    let mut texts = vec![String::new(); n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut timings = Timings { prefill_tokens: prompts.iter().map(Vec::len).sum(), ..Default::default() };
    let pad = tok.eos.first().copied().unwrap_or(0);

    let t0 = Instant::now();
    let mut logits = model.prefill(prompts, cache, PREFILL_CHUNK)?;
    timings.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..max_new {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next: Vec<Vec<u32>> = vec![vec![]; n];
        for b in 0..n {
            if finish[b].is_some() {
                continue;
            }
            let mut l = rows[b].clone();
            let id = samplers[b].sample(&mut l, &history[b]);
            history[b].push(id);
            timings.decode_tokens += 1;
            if !opts.ignore_eos && tok.eos.contains(&id) {
                finish[b] = Some(FinishReason::Eos);
                continue;
            }
            out[b].push(id);
            let piece = streams[b].push(tok, id)?;
            texts[b].push_str(&piece);
            if let Some(cut) = opts.stop.iter().filter_map(|s| texts[b].find(s.as_str())).min() {
                // Emit only what precedes the stop string.
                let already = texts[b].len() - piece.len();
                if cut > already {
                    on_text(b, &texts[b][already..cut]);
                }
                texts[b].truncate(cut);
                finish[b] = Some(FinishReason::Stop);
                continue;
            }
            on_text(b, &piece);
            next[b].push(id);
        }
        if finish.iter().all(Option::is_some) || out.iter().all(|o| o.len() >= max_new) {
            break;
        }
        let (tokens, step) = step_for(&next, cache, pad);
        logits = model.forward(&tokens, &step, cache, Logits::Last)?;
    }
    timings.decode_secs = t1.elapsed().as_secs_f64();
    let gens = (0..n)
        .map(|b| Generation {
            tokens: std::mem::take(&mut out[b]),
            text: std::mem::take(&mut texts[b]),
            finish: finish[b].unwrap_or(FinishReason::Length),
            prompt_tokens: prompts[b].len(),
        })
        .collect();
    Ok((gens, timings))
}
