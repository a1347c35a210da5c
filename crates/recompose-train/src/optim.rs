//! Named parameters, the two optimisers recompose trains with — AdamW (decoupled weight decay,
//! PyTorch's update order) and SGD with momentum — and global-norm gradient clipping. Updates
//! are elementwise, so they are exact and repeatable; the norm is summed in a fixed order.

use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A trainable tensor by name. `decay`: whether weight decay applies (matrices yes; norms,
/// biases no). `group`: a tag an update can be restricted to (AdvMoE's routers vs experts).
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub group: &'static str,
}

impl Param {
    pub fn new(name: impl Into<String>, var: Var, decay: bool, group: &'static str) -> Self {
        Self { name: name.into(), var, decay, group }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    Sgd { momentum: f64, weight_decay: f64 },
}

impl OptimizerKind {
    /// PyTorch's AdamW defaults with the given weight decay.
    pub fn adamw(weight_decay: f64) -> Self {
        OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            OptimizerKind::AdamW { beta1, beta2, eps, weight_decay } => {
                (0.0..1.0).contains(&beta1)
                    && (0.0..1.0).contains(&beta2)
                    && eps > 0.0
                    && eps.is_finite()
                    && weight_decay >= 0.0
                    && weight_decay.is_finite()
            }
            OptimizerKind::Sgd { momentum, weight_decay } => {
                (0.0..1.0).contains(&momentum) && weight_decay >= 0.0 && weight_decay.is_finite()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!("bad optimiser settings: {self:?}")))
        }
    }

    fn buffers(&self) -> usize {
        match self {
            OptimizerKind::AdamW { .. } => 2,
            OptimizerKind::Sgd { .. } => 1,
        }
    }
}

/// One parameter's optimiser state: its own step count (groups may update at different times)
/// and its buffers (AdamW: first and second moments; SGD: momentum).
#[derive(Clone)]
pub struct Slot {
    pub steps: u64,
    pub buffers: Vec<Tensor>,
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub slots: Vec<Slot>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &[Param]) -> Result<Self> {
        kind.validate()?;
        let slots = params
            .iter()
            .map(|p| {
                let z = p.var.as_tensor().zeros_like()?;
                Ok(Slot { steps: 0, buffers: vec![z; kind.buffers()] })
            })
            .collect::<Result<_>>()?;
        Ok(Self { kind, slots })
    }

    /// One update with learning rate `lr` of the parameters `only` accepts, from their
    /// gradients (`grads[i]` for `params[i]`; None leaves a parameter as it is).
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &[Option<Tensor>],
        lr: f64,
        only: &dyn Fn(&Param) -> bool,
    ) -> Result<()> {
        if params.len() != self.slots.len() || grads.len() != params.len() {
            return Err(Error::Config(format!(
                "{} parameters, {} gradients, {} optimiser slots",
                params.len(),
                grads.len(),
                self.slots.len()
            )));
        }
        for ((p, g), slot) in params.iter().zip(grads).zip(self.slots.iter_mut()) {
            let Some(g) = g else { continue };
            if !only(p) {
                continue;
            }
            slot.steps += 1;
            let w = p.var.as_tensor();
            let new = match self.kind {
                OptimizerKind::AdamW { beta1, beta2, eps, weight_decay } => {
                    let wd = if p.decay { weight_decay } else { 0.0 };
                    adamw(w, g, slot, lr, beta1, beta2, eps, wd)?
                }
                OptimizerKind::Sgd { momentum, weight_decay } => {
                    let wd = if p.decay { weight_decay } else { 0.0 };
                    let g = if wd > 0.0 { (g + (w.detach() * wd)?)? } else { g.clone() };
                    let buf = ((&slot.buffers[0] * momentum)? + g)?;
                    let new = (w.detach() - (&buf * lr)?)?;
                    slot.buffers[0] = buf;
                    new
                }
            };
            // A NaN can hide behind a finite loss (ReLU maps it to 0): check the weights.
            if !finite(&new)? {
                return Err(Error::Diverged(format!(
                    "parameter {} became non-finite; lower the learning rate",
                    p.name
                )));
            }
            p.var.set(&new)?;
        }
        Ok(())
    }
}

/// Whether every element is finite (squares summed in f64, so large finite values pass).
fn finite(t: &Tensor) -> Result<bool> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        return Ok(v.par_chunks(8192).all(|c| c.iter().all(|x| x.is_finite())));
    }
    Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.is_finite())
}

/// AdamW as PyTorch computes it (`torch.optim.AdamW`, single-tensor path): decay, moments
/// (`lerp` for the first), bias corrections, `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
#[allow(clippy::too_many_arguments)]
fn adamw(w: &Tensor, g: &Tensor, slot: &mut Slot, lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) -> Result<Tensor> {
    let t = slot.steps as i32;
    let bc1 = 1.0 - b1.powi(t);
    let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
    let step_size = lr / bc1;
    if w.device().is_cpu() && w.dtype() == DType::F32 {
        // One fused pass over f32 data (the tensor-op form below makes eight).
        let (mut p, gv) = (w.flatten_all()?.to_vec1::<f32>()?, g.flatten_all()?.to_vec1::<f32>()?);
        let (mut m, mut v) =
            (slot.buffers[0].flatten_all()?.to_vec1::<f32>()?, slot.buffers[1].flatten_all()?.to_vec1::<f32>()?);
        let (decay, w1, b2f, w2) = ((1.0 - lr * wd) as f32, (1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32);
        let (ss, bc2s, epsf) = (step_size as f32, bc2_sqrt as f32, eps as f32);
        p.par_chunks_mut(8192)
            .zip(m.par_chunks_mut(8192))
            .zip(v.par_chunks_mut(8192))
            .zip(gv.par_chunks(8192))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    p[i] *= decay;
                    m[i] += w1 * (g[i] - m[i]);
                    v[i] = v[i] * b2f + w2 * g[i] * g[i];
                    p[i] -= ss * m[i] / (v[i].sqrt() / bc2s + epsf);
                }
            });
        let shape = w.shape();
        slot.buffers[0] = Tensor::from_vec(m, shape, w.device())?;
        slot.buffers[1] = Tensor::from_vec(v, shape, w.device())?;
        return Ok(Tensor::from_vec(p, shape, w.device())?);
    }
    let p = (w.detach() * (1.0 - lr * wd))?;
    let m = (&slot.buffers[0] + ((g - &slot.buffers[0])? * (1.0 - b1))?)?;
    let v = ((&slot.buffers[1] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
    let new = (p - (m.broadcast_div(&denom)? * step_size)?)?;
    slot.buffers = vec![m, v];
    Ok(new)
}

/// The global L2 norm of the gradients; when it exceeds `max_norm`, every gradient is scaled by
/// `max_norm / (norm + 1e-6)` (PyTorch's `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// `acc += g` per parameter.
pub fn accumulate(acc: &mut [Option<Tensor>], g: Vec<Option<Tensor>>) -> Result<()> {
    for (a, g) in acc.iter_mut().zip(g) {
        if let Some(g) = g {
            *a = Some(match a.take() {
                Some(x) => (x + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn param(v: &[f32]) -> Param {
        Param::new("w", Var::from_slice(v, v.len(), &Device::Cpu).unwrap(), true, "all")
    }

    /// AdamW by hand, in f64, for one coordinate over three steps.
    #[test]
    fn adamw_matches_the_formula_and_the_tensor_form() {
        let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.999, 1e-8, 0.1);
        let kind = OptimizerKind::AdamW { beta1: b1, beta2: b2, eps, weight_decay: wd };
        let p = param(&[0.5, -1.0]);
        let mut opt = Optimizer::new(kind, std::slice::from_ref(&p)).unwrap();
        let (mut w, mut m, mut v) = (0.5f64, 0.0, 0.0);
        for (t, g) in [0.3f64, -0.2, 0.7].into_iter().enumerate() {
            let grads = vec![Some(Tensor::new(&[g as f32, 1.0], &Device::Cpu).unwrap())];
            opt.step(std::slice::from_ref(&p), &grads, lr, &|_| true).unwrap();
            w *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let t = (t + 1) as i32;
            w -= lr / (1.0 - b1.powi(t)) * m / (v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps);
        }
        let got = p.var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
        // The fused f32 pass and the tensor-op form agree (f64 parameters take the latter).
        let p64 = Param::new("w", Var::from_slice(&[0.5f64, -1.0], 2, &Device::Cpu).unwrap(), true, "all");
        let mut opt64 = Optimizer::new(kind, std::slice::from_ref(&p64)).unwrap();
        for g in [0.3f64, -0.2, 0.7] {
            let grads = vec![Some(Tensor::new(&[g, 1.0], &Device::Cpu).unwrap())];
            opt64.step(std::slice::from_ref(&p64), &grads, lr, &|_| true).unwrap();
        }
        let got64 = p64.var.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((got64 - w).abs() < 1e-12, "{got64} vs {w}");
    }

    #[test]
    fn no_decay_and_group_filters_are_respected() {
        let kind = OptimizerKind::adamw(0.5);
        let a = Param::new("norm", Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap(), false, "net");
        let b = Param::new("router", Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap(), true, "router");
        let ps = vec![a.clone(), b.clone()];
        let mut opt = Optimizer::new(kind, &ps).unwrap();
        let zero = || Some(Tensor::new(&[0f32], &Device::Cpu).unwrap());
        opt.step(&ps, &[zero(), zero()], 0.1, &|p| p.group == "net").unwrap();
        // Zero gradient, no decay: unchanged; the router was not updated at all.
        assert_eq!(a.var.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
        assert_eq!(opt.slots[1].steps, 0);
        opt.step(&ps, &[zero(), zero()], 0.1, &|_| true).unwrap();
        assert!((b.var.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.95).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![
            Some(Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap()),
            None,
            Some(Tensor::new(&[4f32], &Device::Cpu).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, Some(1.0)).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let after = clip_grad_norm(&mut g, None).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn a_non_finite_update_is_refused() {
        let p = param(&[1.0]);
        let mut opt =
            Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 }, std::slice::from_ref(&p)).unwrap();
        let e =
            opt.step(std::slice::from_ref(&p), &[Some(Tensor::new(&[f32::NAN], &Device::Cpu).unwrap())], 0.1, &|_| {
                true
            });
        assert!(e.unwrap_err().to_string().contains("non-finite"));
        assert_eq!(p.var.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
    }
}
