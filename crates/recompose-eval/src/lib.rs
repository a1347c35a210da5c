//! recompose-eval: perplexity, multiple choice (MMLU) and speed benchmarks over recompose models.
//! Every evaluation returns a serialisable report; printing is the binary's job.

pub mod bench;
pub mod csv;
pub mod error;
pub mod mmlu;
pub mod passkey;
pub mod ppl;

pub use error::{Error, Result};

/// log_softmax over the last dim, in the tensor's dtype.
pub(crate) fn log_softmax(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    use candle_core::D;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
