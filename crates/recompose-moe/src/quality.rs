//! Held-out quality of a model as its FFNs stand (dense, MoE, pruned): the mean next-token
//! negative log-likelihood over rows of tokens, each token of a row routed to one expert.

use crate::Result;
use recompose_llm::train::Batch;
use recompose_llm::{Model, Plan};

/// Mean NLL per predicted token over `rows` (token `i + 1` of a row predicted from its first
/// `i + 1`), with every token routed to `expert` when given (one route for all layers, as the
/// pre-gating router decides). Returns the mean and the tokens scored.
pub fn held_out_nll(model: &Model, rows: &[Vec<u32>], expert: Option<u32>) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0f64, 0usize);
    for row in rows.iter().filter(|r| r.len() >= 2) {
        let t = row.len() - 1;
        let batch = Batch::from_rows(&[(row[..t].to_vec(), row[1..].to_vec())], 0)?;
        let plan = Plan { routes: expert.map(|e| vec![vec![e; t]]), ..Default::default() };
        let logits = model.forward_train(&batch, &plan)?.logits.reshape((t, ()))?;
        let nll = recompose_llm::grad::cross_entropy(&logits, &batch.targets, 1.0)?;
        sum += nll.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n += t;
    }
    Ok((sum / n.max(1) as f64, n))
}
