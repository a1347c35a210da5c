//! Perplexity with a sliding window: windows of `ctx` tokens every `stride` tokens, each scoring
//! only the tokens the previous window did not (the HF recipe), NLL summed over tokens.

use crate::error::{Error, Result};
use candle_core::DType;
use recompose_llm::{Logits, Model, Step};
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
