//! The MoE FFN of a refactorised model: the permanent channels over every token, then each
//! token's expert over the tokens routed to it (rows grouped by expert, one matmul chain per
//! expert in the step). The result is the dense FFN with every channel outside the permanent
//! set and the token's expert masked to zero, computed without the masked channels.
//!
//! The experts are slices of the dense weights: rows of gate and up, columns of down. Packed
//! (quantised) weights are dequantised into f32 slices.

use crate::{Error, ExpertSplit, Result};
use candle_core::{DType, Device, Tensor};
use recompose_llm::ffn::{DenseFfn, Ffn, FfnContext, FfnOutput};
use recompose_llm::linear::{Linear, Weight};

pub struct MoeFfn {
    layer: usize,
    /// None when no channel is permanent.
    permanent: Option<DenseFfn>,
    /// None for an expert with no channels of its own.
    experts: Vec<Option<DenseFfn>>,
}

impl MoeFfn {
    /// Cuts `dense` (layer `layer` of the model `split` was made for) into its permanent part and
    /// experts.
    pub fn from_dense(dense: &DenseFfn, split: &ExpertSplit, layer: usize) -> Result<Self> {
        let channels = dense.gate.dims().0;
        if layer >= split.layers() || split.channels != channels {
            return Err(Error::Config(format!(
                "layer {layer} of {channels} channels is not in a split of {} layers x {} channels",
                split.layers(),
                split.channels
            )));
        }
        let part = |chans: &[u32]| -> Result<Option<DenseFfn>> {
            if chans.is_empty() {
                return Ok(None);
            }
            Ok(Some(DenseFfn {
                gate: Linear::dense(dense.gate.name.clone(), rows_of(&dense.gate, chans)?),
                up: Linear::dense(dense.up.name.clone(), rows_of(&dense.up, chans)?),
                down: Linear::dense(dense.down.name.clone(), cols_of(&dense.down, chans)?),
                activation: dense.activation,
            }))
        };
        Ok(Self {
            layer,
            permanent: part(&split.permanent[layer])?,
            experts: split.experts[layer].iter().map(|e| part(e)).collect::<Result<_>>()?,
        })
    }

    pub fn experts(&self) -> usize {
        self.experts.len()
    }
}

/// `f32 (len(chans), cols)`: rows `chans` of a linear's weight.
fn rows_of(l: &Linear, chans: &[u32]) -> Result<Tensor> {
    match &l.weight {
        Weight::Dense(w) => {
            let idx = Tensor::new(chans, w.device())?;
            Ok(w.index_select(&idx, 0)?.to_dtype(DType::F32)?.contiguous()?)
        }
        Weight::Packed(p) => {
            let cols = p.cols();
            let mut out = vec![0f32; chans.len() * cols];
            for (row, &c) in out.chunks_exact_mut(cols).zip(chans) {
                p.dequantize_row(c as usize, row);
            }
            Ok(Tensor::from_vec(out, (chans.len(), cols), &Device::Cpu)?)
        }
    }
}

/// `f32 (rows, len(chans))`: columns `chans` of a linear's weight.
fn cols_of(l: &Linear, chans: &[u32]) -> Result<Tensor> {
    match &l.weight {
        Weight::Dense(w) => {
            let idx = Tensor::new(chans, w.device())?;
            Ok(w.index_select(&idx, 1)?.to_dtype(DType::F32)?.contiguous()?)
        }
        Weight::Packed(p) => {
            let (rows, cols) = (p.rows(), p.cols());
            let mut full = vec![0f32; cols];
            let mut out = Vec::with_capacity(rows * chans.len());
            for r in 0..rows {
                p.dequantize_row(r, &mut full);
                out.extend(chans.iter().map(|&c| full[c as usize]));
            }
            Ok(Tensor::from_vec(out, (rows, chans.len()), &Device::Cpu)?)
        }
    }
}

fn run(part: &DenseFfn, x: &Tensor) -> recompose_llm::Result<Tensor> {
    part.down.forward(&part.hidden(x, None, None)?)
}

impl Ffn for MoeFfn {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        let bad = |m: String| recompose_llm::Error::InvalidInput(m);
        let (n, hidden) = x.dims2()?;
        let Some(route) = ctx.route else {
            return Err(bad(format!(
                "layer {}: the MoE FFN needs each token's expert (the router's routes)",
                self.layer
            )));
        };
        if route.len() != n {
            return Err(bad(format!("layer {}: {} routes for {n} tokens", self.layer, route.len())));
        }
        if let Some(&e) = route.iter().find(|&&e| e as usize >= self.experts.len()) {
            return Err(bad(format!("layer {}: route to expert {e} of {}", self.layer, self.experts.len())));
        }
        let mut y = match &self.permanent {
            Some(p) => run(p, x)?,
            None => Tensor::zeros((n, hidden), x.dtype(), x.device())?,
        };
        let mut usage = vec![0u64; self.experts.len()];
        for (i, &e) in route.iter().enumerate() {
            if i % ctx.t.max(1) < ctx.lens[ctx.sequence_of(i)] {
                usage[e as usize] += 1;
            }
        }
        for (e, part) in self.experts.iter().enumerate() {
            let rows: Vec<u32> = (0..n as u32).filter(|&i| route[i as usize] as usize == e).collect();
            let Some(part) = part.as_ref().filter(|_| !rows.is_empty()) else { continue };
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            let ye = run(part, &x.index_select(&idx, 0)?)?;
            y = y.index_add(&idx, &ye, 0)?;
        }
        Ok(FfnOutput { y, aux_loss: None, usage: Some(usage) })
    }
}

/// Runs `f` on `model` with every layer's dense FFN replaced by its MoE cut under `split`
/// (checked against the model first); the dense FFNs are back afterwards, whatever `f` gave.
pub fn with_moe<R, E: From<Error>>(
    model: &mut recompose_llm::Model,
    split: &ExpertSplit,
    f: impl FnOnce(&recompose_llm::Model) -> std::result::Result<R, E>,
) -> std::result::Result<R, E> {
    let channels = model.layers.first().and_then(|b| b.ffn.as_dense()).map_or(0, |d| d.gate.dims().0);
    split.check(model.layers.len(), channels)?;
    let mut moes = Vec::with_capacity(model.layers.len());
    for (l, block) in model.layers.iter().enumerate() {
        let dense = block.ffn.as_dense().ok_or_else(|| Error::Config(format!("layer {l}: not a dense FFN")))?;
        moes.push(MoeFfn::from_dense(dense, split, l)?);
    }
    let dense: Vec<Box<dyn Ffn>> =
        model.layers.iter_mut().zip(moes).map(|(b, m)| std::mem::replace(&mut b.ffn, Box::new(m))).collect();
    let out = f(model);
    for (b, d) in model.layers.iter_mut().zip(dense) {
        b.ffn = d;
    }
    out
}
