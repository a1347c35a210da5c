//! Perplexity with a sliding window: windows of `ctx` tokens every `stride` tokens, each scoring
//! only the tokens the previous window did not (the HF recipe), NLL summed over tokens.

use crate::error::{Error, Result};
use candle_core::DType;
use recompose_llm::{KvCache, Logits, Model, Step};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PplWindow {
    pub begin: usize,
    pub end: usize,
    pub n_scored: usize,
    pub nll: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    pub total_nll: f64,
    pub n_scored: usize,
    pub n_tokens: usize,
    pub ctx: usize,
    pub stride: usize,
    pub windows: Vec<PplWindow>,
}

/// Scores `ids`: for each window [begin, end) the tokens from max(prev_end, begin + 1) to end - 1
/// are predicted from everything before them in the window. `on_window(done, total)` reports
/// progress.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PplReport> {
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(Error::Invalid(format!("need ctx >= 2 and 0 < stride <= ctx (got ctx {ctx}, stride {stride})")));
    }
    if ids.len() < 2 {
        return Err(Error::Invalid("need at least 2 tokens".into()));
    }
    let n = ids.len();
    let total_windows = n.saturating_sub(ctx).div_ceil(stride) + 1;
    let mut windows = vec![];
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        let from = prev_end.max(begin + 1);
        if from < end {
            let window = &ids[begin..end];
            let mut cache = model.new_cache(1);
            let step = Step { start: vec![0], lens: vec![window.len()], t: window.len() };
            // Logits at window column c predict token c + 1; we need columns from - 1 .. end - 1.
            let first_col = from - 1 - begin;
            let logits = model.forward(window, &step, &mut cache, Logits::From(first_col))?;
            let logp = crate::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F64)?)?;
            let rows: Vec<Vec<f64>> = logp.to_vec2()?;
            let mut nll = 0.0;
            for (i, row) in rows.iter().enumerate().take(end - from) {
                nll -= row[ids[from + i] as usize];
            }
            windows.push(PplWindow { begin, end, n_scored: end - from, nll });
        }
        prev_end = end;
        on_window(windows.len(), total_windows);
        if end == n {
            break;
        }
        begin += stride;
    }
    let total_nll: f64 = windows.iter().map(|w| w.nll).sum();
    let n_scored: usize = windows.iter().map(|w| w.n_scored).sum();
    Ok(PplReport { ppl: (total_nll / n_scored as f64).exp(), total_nll, n_scored, n_tokens: n, ctx, stride, windows })
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub ppl: f64,
    pub total_nll: f64,
    pub n_scored: usize,
    pub chunk: usize,
    /// Perplexity of each successive block of `block` scored tokens (how quality evolves as
    /// the text grows past the budget).
    pub block: usize,
    pub block_ppl: Vec<f64>,
    /// Largest KV storage held at any step.
    pub peak_kv_bytes: usize,
}

/// Streams `ids` through one cache in steps of `chunk` tokens (1: token by token), every token
/// after the first predicted from what the cache kept of everything before it. The cache is told
/// up front that there is no prompt, so a bounded policy evicts from the first step.
pub fn stream_perplexity(
    model: &Model,
    ids: &[u32],
    cache: &mut dyn KvCache,
    chunk: usize,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<StreamReport> {
    if chunk == 0 {
        return Err(Error::Invalid("--chunk must be at least 1".into()));
    }
    if ids.len() < 2 {
        return Err(Error::Invalid("need at least 2 tokens".into()));
    }
    if ids.len() > model.config.max_position {
        return Err(
            recompose_llm::Error::ContextOverflow { tokens: ids.len(), context: model.config.max_position }.into()
        );
    }
    const BLOCK: usize = 1024;
    cache.end_prefill()?;
    let (mut total, mut block_nll, mut block_n) = (0f64, 0f64, 0usize);
    let mut block_ppl = vec![];
    let mut peak = 0;
    let mut at = 0;
    // The last token is only ever a target.
    let inputs = ids.len() - 1;
    while at < inputs {
        let t = chunk.min(inputs - at);
        let step = Step { start: vec![at], lens: vec![t], t };
        let logits = model.forward(&ids[at..at + t], &step, cache, Logits::All)?;
        let logp = crate::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F64)?)?;
        let rows: Vec<Vec<f64>> = logp.to_vec2()?;
        for (i, row) in rows.iter().enumerate() {
            let nll = -row[ids[at + i + 1] as usize];
            total += nll;
            block_nll += nll;
            block_n += 1;
            if block_n == BLOCK {
                block_ppl.push((block_nll / BLOCK as f64).exp());
                (block_nll, block_n) = (0.0, 0);
            }
        }
        peak = peak.max(cache.resident_bytes());
        at += t;
        on_progress(at, inputs);
    }
    if block_n > 0 {
        block_ppl.push((block_nll / block_n as f64).exp());
    }
    Ok(StreamReport {
        ppl: (total / inputs as f64).exp(),
        total_nll: total,
        n_scored: inputs,
        chunk,
        block: BLOCK,
        block_ppl,
        peak_kv_bytes: peak,
    })
}
