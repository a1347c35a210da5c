//! The FFN seam: a block's feed-forward network behind a trait, so dense, MoE (recompose-moe)
//! and elastic (recompose-elastic) FFNs plug in without touching attention. A forward call sees
//! a per-layer context (which layer, how the rows of `x` map to sequences and positions, and what
//! was decided before the backbone ran: a route per token, a width per row) and may hand back
//! side outputs (an auxiliary loss for training, expert usage for statistics).

use crate::error::{Error, Result};
use crate::linear::Linear;
use candle_core::Tensor;
use recompose_core::config::Activation;

/// What one FFN call knows beyond its input. Rows of `x` are the step's `batch x t` columns,
/// row-major; column `j` of sequence `b` sits at position `start[b] + j` and is real (not
/// padding) when `j < lens[b]`.
#[derive(Debug, Clone, Copy)]
pub struct FfnContext<'a> {
    pub layer: usize,
    pub batch: usize,
    pub t: usize,
    pub start: &'a [usize],
    pub lens: &'a [usize],
    /// Per row of `x`: the expert chosen for this layer before the backbone ran (Read-ME's
    /// pre-gating router).
    pub route: Option<&'a [u32]>,
    /// Per sequence: how many FFN channels (a prefix) it runs with (elastic sub-networks).
    pub width: Option<&'a [usize]>,
    /// Set while training: the seed of this layer's dropout masks.
    pub dropout_seed: Option<u64>,
}

impl FfnContext<'_> {
    /// The sequence row `i` of `x` belongs to.
    pub fn sequence_of(&self, i: usize) -> usize {
        i / self.t.max(1)
    }
}

/// An FFN's result: the output `(N, hidden)` and optional side outputs.
pub struct FfnOutput {
    pub y: Tensor,
    /// Added to the training loss as is (the FFN chooses its weight).
    pub aux_loss: Option<Tensor>,
    /// Tokens per expert (or per width) in this call.
    pub usage: Option<Vec<u64>>,
}

impl FfnOutput {
    pub fn plain(y: Tensor) -> Self {
        Self { y, aux_loss: None, usage: None }
    }
}

pub trait Ffn: Send + Sync {
    /// `x: (N, hidden) -> (N, hidden)` plus side outputs.
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> Result<FfnOutput>;

    /// The dense FFN this is, if it is one: what tools that cut a model's FFNs apart (Read-ME's
    /// experts, elastic widths) read the weights from. None by default.
    fn as_dense(&self) -> Option<&DenseFfn> {
        None
    }

    /// The linear layers adapters may attach to, by their path inside the block
    /// (`mlp.gate_proj`, ...). None by default.
    fn linears(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![]
    }

    /// Seconds this FFN has spent choosing its tokens' routes (a layer-wise MoE gate), for the
    /// routers' share of step time. 0 by default.
    fn routing_seconds(&self) -> f64 {
        0.0
    }

    /// The experts the steps after the current one will need, nearest first, as far as the
    /// scheduler knows them (sequences routed ahead): an FFN that loads its experts on demand
    /// may keep those. Ignored by default.
    fn upcoming(&self, _steps: &[Vec<u32>]) {}
}

/// The gated MLP of Llama and Gemma: `down(act(gate(x)) * up(x))`. With a per-sequence width it
/// runs the first `width` channels only (a nested sub-network, as Flextron ranks them).
pub struct DenseFfn {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
}

impl DenseFfn {
    /// The down projection's input `act(gate(x)) * up(x)`, `(N, width)`: the channels Read-ME
    /// ranks and splits into experts.
    pub fn hidden(&self, x: &Tensor, width: Option<usize>, seed: Option<u64>) -> Result<Tensor> {
        let s = |k: u64| seed.map(|s| crate::lora::mix(s ^ k));
        let w = width.unwrap_or(self.gate.dims().0);
        let [g, u] = crate::linear::forward_group([(&self.gate, w, s(1)), (&self.up, w, s(2))], x)?;
        Ok(crate::grad::gated(&g, &u, self.activation)?)
    }

    fn run(&self, x: &Tensor, width: Option<usize>, seed: Option<u64>) -> Result<Tensor> {
        let a = self.hidden(x, width, seed)?;
        self.down.forward_prefix(&a, None, width, seed.map(|s| crate::lora::mix(s ^ 3)))
    }
}

impl Ffn for DenseFfn {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> Result<FfnOutput> {
        let full = self.gate.dims().0;
        let Some(widths) = ctx.width else { return Ok(FfnOutput::plain(self.run(x, None, ctx.dropout_seed)?)) };
        if widths.len() != ctx.batch {
            return Err(Error::InvalidInput(format!("{} widths for {} sequences", widths.len(), ctx.batch)));
        }
        if let Some(&w) = widths.iter().find(|&&w| w == 0 || w > full) {
            return Err(Error::InvalidInput(format!("FFN width {w} outside 1..={full}")));
        }
        // Sequences of one width run together; rows go back in their order.
        let mut distinct: Vec<usize> = widths.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == 1 {
            let w = (distinct[0] < full).then_some(distinct[0]);
            return Ok(FfnOutput::plain(self.run(x, w, ctx.dropout_seed)?));
        }
        let t = ctx.t;
        let mut parts = vec![];
        let mut order = vec![];
        for &w in &distinct {
            let rows: Vec<u32> = (0..ctx.batch)
                .filter(|&b| widths[b] == w)
                .flat_map(|b| (b * t..(b + 1) * t).map(|i| i as u32))
                .collect();
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            parts.push(self.run(&x.index_select(&idx, 0)?, (w < full).then_some(w), ctx.dropout_seed)?);
            order.extend(rows);
        }
        let mut inv = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inv[i as usize] = pos as u32;
        }
        let y = Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inv.as_slice(), x.device())?, 0)?;
        Ok(FfnOutput::plain(y))
    }

    fn as_dense(&self) -> Option<&DenseFfn> {
        Some(self)
    }

    fn linears(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![("mlp.gate_proj", &mut self.gate), ("mlp.up_proj", &mut self.up), ("mlp.down_proj", &mut self.down)]
    }
}
