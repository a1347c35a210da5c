//! Training the pre-gating router (Read-ME): the engine's [`PreGate`] (one causal block over the
//! backbone's frozen token embeddings, run before the blocks) distilled towards each token's
//! oracle expert (`oracle`) with AdamW. The router trains in the model, through the same
//! forward pass that routes at run time.

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use recompose_llm::pregate::{PreGate, PreGateConfig};
use recompose_llm::{Batch, Model};
use recompose_train::{Optimizer, OptimizerKind, Param};

/// A fresh trainable router for `model` over `experts` experts with an MLP of width `ffn`,
/// seeded, in the model's float type and on its device.
pub fn init(model: &Model, experts: usize, ffn: usize, seed: u64) -> Result<PreGate> {
    Ok(PreGate::init(PreGateConfig { experts, ffn }, &model.config, seed, model.dtype(), model.device())?)
}

/// `sum` of the cross-entropy of `targets` (one expert per token, row-major) over `rows` of
/// tokens (all the same length), through `model`'s router.
pub fn loss(model: &Model, rows: &[Vec<u32>], targets: &[u32]) -> Result<Tensor> {
    let b = Batch::from_rows(&rows.iter().map(|r| (r.clone(), r.clone())).collect::<Vec<_>>(), 0)?;
    if targets.len() != b.rows * b.t || rows.iter().any(|r| r.len() != b.t) {
        return Err(Error::Config(format!("{} targets for {} rows of {} tokens", targets.len(), b.rows, b.t)));
    }
    Ok(recompose_llm::grad::cross_entropy(&model.route_logits(&b)?, targets, 1.0)?)
}

/// How the router trains.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    pub steps: usize,
    pub lr: f64,
    /// Rows per step.
    pub batch: usize,
    pub seed: u64,
}

/// Trains the router of `model` (set with trainable weights, [`init`]) for `opts.steps` AdamW
/// steps on `rows` of tokens (all the same length) with one target expert per token;
/// `progress(step, mean loss)` after each step. Returns the mean loss per target of every step.
pub fn train(
    model: &Model,
    rows: &[Vec<u32>],
    targets: &[Vec<u32>],
    opts: TrainOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<Vec<f64>> {
    if rows.is_empty() || rows.len() != targets.len() || opts.batch == 0 || !(opts.lr > 0.0) {
        return Err(Error::Config(format!(
            "router training: {} rows, {} target rows, batch {}, lr {}",
            rows.len(),
            targets.len(),
            opts.batch,
            opts.lr
        )));
    }
    let g = model.pregate().ok_or_else(|| Error::Config("router training: the model has no router".into()))?;
    if g.vars().is_empty() {
        return Err(Error::Config("router training: the router is frozen (make it with router::init)".into()));
    }
    let params: Vec<Param> =
        g.vars().iter().map(|(n, v)| Param::new(n.clone(), v.clone(), v.as_tensor().rank() >= 2, "router")).collect();
    let mut opt = Optimizer::new(OptimizerKind::adamw(0.01), &params)?;
    let mut order = recompose_train::data::Order::new(opts.seed, rows.len());
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let pick: Vec<usize> = (0..opts.batch.min(rows.len())).map(|i| order.row(step * opts.batch + i)).collect();
        let batch: Vec<Vec<u32>> = pick.iter().map(|&r| rows[r].clone()).collect();
        let tgt: Vec<u32> = pick.iter().flat_map(|&r| targets[r].iter().copied()).collect();
        let l = loss(model, &batch, &tgt)?;
        let grads = l.backward()?;
        let gs: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
        opt.step(&params, &gs, opts.lr, &|_| true)?;
        let mean = l.to_dtype(DType::F64)?.to_scalar::<f64>()? / tgt.len().max(1) as f64;
        losses.push(mean);
        progress(step + 1, mean);
    }
    Ok(losses)
}
