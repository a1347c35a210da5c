//! Held-out quality of a model as its FFNs stand (dense, MoE, pruned): the mean next-token
//! negative log-likelihood over rows of tokens.

use crate::{Error, Result};
use recompose_llm::train::Batch;
use recompose_llm::{Model, Plan};

/// Mean NLL per predicted token over `rows` (token `i + 1` of a row predicted from its first
/// `i + 1`). With `routes`, token `j` of row `i` goes to expert `routes[i][j]` in every layer (as
/// the pre-gating router decides); [`everyone_to`] routes all tokens to one expert. Returns the
/// mean and the tokens scored.
pub fn held_out_nll(model: &Model, rows: &[Vec<u32>], routes: Option<&[Vec<u32>]>) -> Result<(f64, usize)> {
    if let Some(r) = routes {
        if r.len() != rows.len() || r.iter().zip(rows).any(|(r, row)| r.len() != row.len()) {
            return Err(Error::Config("one route per token of every row needed".into()));
        }
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for (i, row) in rows.iter().enumerate().filter(|(_, r)| r.len() >= 2) {
        let t = row.len() - 1;
        let batch = Batch::from_rows(&[(row[..t].to_vec(), row[1..].to_vec())], 0)?;
        let plan = Plan { routes: routes.map(|r| vec![r[i][..t].to_vec()]), ..Default::default() };
        let logits = model.forward_train(&batch, &plan)?.logits.reshape((t, ()))?;
        let nll = recompose_llm::grad::cross_entropy(&logits, &batch.targets, 1.0)?;
        sum += nll.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n += t;
    }
    Ok((sum / n.max(1) as f64, n))
}

/// Routes sending every token of `rows` to `expert`.
pub fn everyone_to(rows: &[Vec<u32>], expert: u32) -> Vec<Vec<u32>> {
    rows.iter().map(|r| vec![expert; r.len()]).collect()
}
