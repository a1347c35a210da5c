//! The layer-wise routing baseline Read-ME compares its pre-gate against: the same experts, but
//! one linear gate per layer over that layer's FFN input, picking the token's expert for that
//! layer alone (a conventional MoE gate, so routes are known only when the layer runs). Each gate
//! is distilled, as the pre-gate is, towards the oracle expert, here the layer's own: the expert
//! whose channels hold most of the token's active channels at that layer in the dense model.

use crate::stats::{observe, Sink};
use crate::{Error, ExpertSplit, MoeFfn, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use recompose_llm::ffn::{Ffn, FfnContext, FfnOutput};
use recompose_llm::linear::Linear;
use recompose_llm::Model;
use recompose_train::{Optimizer, OptimizerKind, Param};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Every `every`-th token's FFN input at every layer of the dense model, over `rows`:
/// `inputs[layer]` is `(tokens, hidden)` f32, tokens in row order.
pub fn inputs(model: &mut Model, rows: &[Vec<u32>], every: usize) -> Result<Vec<Tensor>> {
    let every = every.max(1);
    let seen: Arc<Mutex<Vec<Vec<Tensor>>>> = Arc::new(Mutex::new(vec![vec![]; model.layers.len()]));
    let s = seen.clone();
    let sink: Arc<Sink> = Arc::new(move |_row, layer, x: &Tensor, _a: &[Vec<f32>]| {
        let n = x.dims()[0];
        let keep: Vec<u32> = (0..n as u32).step_by(every).collect();
        let picked = Tensor::new(keep.as_slice(), x.device()).and_then(|i| x.index_select(&i, 0)?.to_dtype(DType::F32));
        if let (Ok(t), Ok(mut s)) = (picked, s.lock()) {
            s[layer].push(t);
        }
    });
    observe(model, rows, sink, |_, _| {})?;
    let seen = seen.lock().map_err(|_| Error::Data("inputs poisoned".into()))?;
    seen.iter().map(|l| Ok(Tensor::cat(l, 0)?)).collect()
}

/// One linear gate per layer, `(experts, hidden)`.
pub struct Gates {
    pub experts: usize,
    pub weights: Vec<Tensor>,
}

impl Gates {
    /// Each token's pick at `layer` from its FFN inputs `x (tokens, hidden)`.
    pub fn route(&self, layer: usize, x: &Tensor) -> Result<Vec<u32>> {
        Ok(x.to_dtype(DType::F32)?.matmul(&self.weights[layer].t()?)?.argmax(D::Minus1)?.to_vec1()?)
    }

    /// The name of layer `l`'s gate in a gates file.
    pub fn name(l: usize) -> String {
        format!("model.layers.{l}.mlp.gate.weight")
    }

    /// The gates by name (what a MoE folder's `gates.safetensors` holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.weights.iter().enumerate().map(|(l, w)| (Self::name(l), w.clone())).collect()
    }

    /// `layers` gates over `experts` experts for FFN inputs of width `hidden`, fetched by name
    /// through `get` and checked.
    pub fn from_tensors(
        layers: usize,
        experts: usize,
        hidden: usize,
        mut get: impl FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let weights = (0..layers)
            .map(|l| {
                let name = Self::name(l);
                let t = get(&name)?.to_dtype(DType::F32)?;
                if t.dims() != [experts, hidden] {
                    return Err(Error::Data(format!(
                        "{name} is {:?}, the split needs [{experts}, {hidden}]",
                        t.dims()
                    )));
                }
                Ok(t)
            })
            .collect::<Result<_>>()?;
        Ok(Self { experts, weights })
    }
}

/// Trains the gates for `steps` AdamW steps of `batch` tokens per layer (all layers each step)
/// on FFN inputs `xs[layer] (tokens, hidden)` towards `targets[layer][token]`; returns them with
/// the mean loss of each step.
pub fn train(
    xs: &[Tensor],
    targets: &[Vec<u32>],
    experts: usize,
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
) -> Result<(Gates, Vec<f64>)> {
    if xs.is_empty() || xs.len() != targets.len() || batch == 0 || !(lr > 0.0) {
        return Err(Error::Config(format!(
            "layer-wise gates: {} layers of inputs, {} of targets, batch {batch}, lr {lr}",
            xs.len(),
            targets.len()
        )));
    }
    let hidden = xs[0].dims2()?.1;
    let mut params = vec![];
    for (l, (x, t)) in xs.iter().zip(targets).enumerate() {
        if x.dims2()?.0 != t.len() || t.iter().any(|&e| e as usize >= experts) {
            return Err(Error::Config(format!(
                "layer {l}: {} inputs for {} targets of {experts} experts",
                x.dims2()?.0,
                t.len()
            )));
        }
        let init: Vec<f32> = (0..experts * hidden)
            .map(|i| 0.02 * recompose_llm::lora::normal(seed ^ (l as u64 + 1), i as u64) as f32)
            .collect();
        let w = Var::from_tensor(&Tensor::from_vec(init, (experts, hidden), &Device::Cpu)?)?;
        params.push(Param::new(format!("gate.{l}"), w, true, "gates"));
    }
    let mut opt = Optimizer::new(OptimizerKind::adamw(0.01), &params)?;
    let n = targets[0].len();
    let mut order = recompose_train::data::Order::new(seed, n);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let pick: Vec<u32> = (0..batch.min(n)).map(|i| order.row(step * batch + i) as u32).collect();
        let idx = Tensor::new(pick.as_slice(), &Device::Cpu)?;
        let mut total: Option<Tensor> = None;
        for ((x, t), p) in xs.iter().zip(targets).zip(&params) {
            let tgt: Vec<u32> = pick.iter().map(|&i| t[i as usize]).collect();
            let logits = x.index_select(&idx, 0)?.matmul(&p.var.as_tensor().t()?)?;
            let l = recompose_llm::grad::cross_entropy(&logits, &tgt, 1.0 / pick.len() as f64)?;
            total = Some(match total {
                Some(s) => (s + l)?,
                None => l,
            });
        }
        let total = total.ok_or_else(|| Error::Config("no layers".into()))?;
        let grads = total.backward()?;
        let g: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
        opt.step(&params, &g, lr, &|_| true)?;
        losses.push(total.to_dtype(DType::F64)?.to_scalar::<f64>()? / xs.len() as f64);
    }
    let weights = params.iter().map(|p| p.var.as_tensor().detach()).collect();
    Ok((Gates { experts, weights }, losses))
}

/// A layer's MoE FFN behind its own gate: the gate picks each token's expert from the FFN's
/// input, then the MoE runs with those routes (whatever the step's plan says).
pub struct GatedMoe {
    moe: MoeFfn,
    gate: Linear,
    /// Nanoseconds spent in the gate (its share of step time).
    nanos: AtomicU64,
}

impl Ffn for GatedMoe {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        let t0 = std::time::Instant::now();
        let routes: Vec<u32> = self.gate.forward(x)?.argmax(D::Minus1)?.to_vec1()?;
        self.nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.moe.forward(x, &FfnContext { route: Some(&routes), ..*ctx })
    }

    fn routing_seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// Every layer of `model` cut under `split` behind its gate (each timed: `Model::routing_seconds`).
pub fn gated(model: &Model, split: &ExpertSplit, gates: &Gates) -> Result<Vec<Box<dyn Ffn>>> {
    behind_gates(crate::ffn::cut(model, split)?, gates, model.dtype(), model.device())
}

/// Each layer's MoE FFN behind its gate (moved to `dtype` on `device`).
pub fn behind_gates(moes: Vec<MoeFfn>, gates: &Gates, dtype: DType, device: &Device) -> Result<Vec<Box<dyn Ffn>>> {
    let experts = moes.first().map_or(0, |m| m.experts());
    if gates.weights.len() != moes.len() || gates.experts != experts {
        return Err(Error::Config(format!(
            "{} gates over {} experts for {} layers and {experts} experts",
            gates.weights.len(),
            gates.experts,
            moes.len(),
        )));
    }
    moes.into_iter()
        .zip(&gates.weights)
        .enumerate()
        .map(|(l, (moe, w))| -> Result<Box<dyn Ffn>> {
            let gate = Linear::dense(Gates::name(l), w.to_dtype(dtype)?.to_device(device)?);
            Ok(Box::new(GatedMoe { moe, gate, nanos: AtomicU64::new(0) }) as Box<dyn Ffn>)
        })
        .collect()
}
