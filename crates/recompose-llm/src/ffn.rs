//! The FFN seam: a block's feed-forward network behind a trait, so dense, MoE (recompose-moe)
//! and elastic (recompose-elastic) FFNs plug in without touching attention.

use crate::error::Result;
use crate::linear::Linear;
use candle_core::Tensor;
use recompose_core::config::Activation;

pub trait Ffn: Send + Sync {
    /// `x: (N, hidden) -> (N, hidden)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// The gated MLP of Llama and Gemma: `down(act(gate(x)) * up(x))`.
pub struct DenseFfn {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
}

impl Ffn for DenseFfn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        let a = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward(&(a * u)?)
    }
}
