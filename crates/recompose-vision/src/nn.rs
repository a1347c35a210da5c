//! Layers with explicit parameters: conv, batch norm, linear, and the functional pieces (log-softmax,
//! cross-entropy, KL) the training losses need. Parameters are candle `Var`s registered in network
//! order, so a checkpoint lists them in the order the RWS tools expect ("first K layers").

use crate::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use std::sync::Mutex;

/// Which parameters a forward pass tracks for gradients. Untracked ones are detached, so their
/// (expensive) weight gradients are never computed: attacks track none, AdvMoE's phases one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    All,
    None,
    /// Everything but the routers (AdvMoE expert phase).
    Experts,
    /// Only the routers (AdvMoE router phase).
    Routers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Net,
    Router,
}

impl Group {
    /// The tag of the group's parameters, which optimiser steps can be restricted to.
    pub fn tag(self) -> &'static str {
        match self {
            Group::Net => "net",
            Group::Router => "router",
        }
    }
}

impl Track {
    fn tracks(self, g: Group) -> bool {
        match self {
            Track::All => true,
            Track::None => false,
            Track::Experts => g == Group::Net,
            Track::Routers => g == Group::Router,
        }
    }
}

/// A named parameter (recompose-train's): weight decay applies to conv/linear weights only (not
/// BN affine or biases); the group tag is [`Group::tag`].
pub use recompose_train::Param;

/// Collects parameters and BN buffers in construction (= network) order.
pub struct Builder<'a> {
    pub rng: &'a mut StdRng,
    pub dtype: DType,
    pub device: Device,
    pub params: Vec<Param>,
    pub buffers: Vec<(String, std::sync::Arc<Mutex<Tensor>>)>,
    /// The order tensors are written in: params and buffers interleaved as built.
    pub order: Vec<String>,
}

impl<'a> Builder<'a> {
    pub fn new(rng: &'a mut StdRng, dtype: DType) -> Self {
        Builder { rng, dtype, device: Device::Cpu, params: vec![], buffers: vec![], order: vec![] }
    }

    fn normal(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| std * crate::corrupt::normal(self.rng)).collect()
    }

    pub fn param(&mut self, name: String, values: Vec<f64>, shape: &[usize], group: Group, decay: bool) -> Result<Var> {
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        self.order.push(name.clone());
        self.params.push(Param::new(name, var.clone(), decay, group.tag()));
        Ok(var)
    }

    /// Kaiming-normal (fan-in, ReLU gain) weights.
    pub fn kaiming(&mut self, name: String, shape: &[usize], group: Group) -> Result<Var> {
        let fan_in: usize = shape[1..].iter().product();
        let v = self.normal(shape.iter().product(), (2.0 / fan_in as f64).sqrt());
        self.param(name, v, shape, group, true)
    }

    pub fn constant(&mut self, name: String, n: usize, value: f64, group: Group) -> Result<Var> {
        self.param(name, vec![value; n], &[n], group, false)
    }

    pub fn buffer(&mut self, name: String, n: usize, value: f64) -> Result<std::sync::Arc<Mutex<Tensor>>> {
        let t = Tensor::full(value, n, &self.device)?.to_dtype(self.dtype)?;
        let b = std::sync::Arc::new(Mutex::new(t));
        self.order.push(name.clone());
        self.buffers.push((name, b.clone()));
        Ok(b)
    }
}

/// How a forward pass runs: BN mode and which parameters carry gradients.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub train: bool,
    pub track: Track,
}

impl Ctx {
    pub fn eval() -> Self {
        Ctx { train: false, track: Track::None }
    }
    pub fn param(&self, v: &Var, g: Group) -> Tensor {
        if self.track.tracks(g) {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
}

pub struct Conv {
    pub w: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub pad: usize,
    pub group: Group,
}

impl Conv {
    pub fn new(
        b: &mut Builder,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
        g: Group,
    ) -> Result<Self> {
        let w = b.kaiming(format!("{name}.weight"), &[cout, cin, k, k], g)?;
        let bias = if bias { Some(b.constant(format!("{name}.bias"), cout, 0.0, g)?) } else { None };
        Ok(Conv { w, bias, stride, pad: k / 2, group: g })
    }

    pub fn out_channels(&self) -> usize {
        self.w.as_tensor().dims()[0]
    }

    /// The convolution restricted to output channels `[lo, lo + n)`: the expert-grouped path.
    pub fn forward_channels(&self, x: &Tensor, ctx: &Ctx, lo: usize, n: usize) -> Result<Tensor> {
        let w = ctx.param(&self.w, self.group);
        let w = if lo == 0 && n == self.out_channels() { w } else { w.narrow(0, lo, n)? };
        let y = crate::conv::conv2d(x, &w, self.pad, self.stride)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&ctx.param(b, self.group).narrow(0, lo, n)?.reshape((1, n, 1, 1))?)?),
            None => Ok(y),
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward_channels(x, ctx, 0, self.out_channels())
    }

    /// Multiply-adds per image for `active` output channels on an `h x w` input.
    pub fn macs(&self, h: usize, w: usize, active: usize) -> (u64, usize, usize) {
        let d = self.w.as_tensor().dims();
        let (ho, wo) = ((h + 2 * self.pad - d[2]) / self.stride + 1, (w + 2 * self.pad - d[3]) / self.stride + 1);
        ((d[1] * d[2] * d[3] * active * ho * wo) as u64, ho, wo)
    }
}

pub struct BatchNorm {
    pub group: Group,
    pub gamma: Var,
    pub beta: Var,
    pub mean: std::sync::Arc<Mutex<Tensor>>,
    pub var: std::sync::Arc<Mutex<Tensor>>,
}

const BN_EPS: f64 = crate::norm::EPS;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    pub fn new(b: &mut Builder, name: &str, c: usize, group: Group) -> Result<Self> {
        let gamma = b.constant(format!("{name}.weight"), c, 1.0, group)?;
        let beta = b.constant(format!("{name}.bias"), c, 0.0, group)?;
        let mean = b.buffer(format!("{name}.running_mean"), c, 0.0)?;
        let var = b.buffer(format!("{name}.running_var"), c, 1.0)?;
        Ok(BatchNorm { group, gamma, beta, mean, var })
    }

    /// Batch norm over channels `[lo, lo + n)` of the layer (the expert-grouped path passes a slice).
    pub fn forward_channels(&self, x: &Tensor, ctx: &Ctx, lo: usize, n: usize) -> Result<Tensor> {
        let g = ctx.param(&self.gamma, self.group).narrow(0, lo, n)?;
        let b = ctx.param(&self.beta, self.group).narrow(0, lo, n)?;
        if ctx.train {
            let x = x.contiguous()?;
            let (mu, var) = crate::norm::channel_stats(&x)?;
            // Running statistics use the unbiased variance, as PyTorch does.
            let count = (x.elem_count() / n) as f64;
            let unbiased: Vec<f64> = var.iter().map(|v| v * count / (count - 1.0).max(1.0)).collect();
            let dev = x.device();
            self.update(&self.mean, &Tensor::from_vec(mu, n, dev)?.to_dtype(x.dtype())?, lo, n)?;
            self.update(&self.var, &Tensor::from_vec(unbiased, n, dev)?.to_dtype(x.dtype())?, lo, n)?;
            return Ok(crate::norm::batch_norm_train(&x, &g.contiguous()?, &b.contiguous()?)?);
        }
        let mean = lock(&self.mean)?.narrow(0, lo, n)?;
        let inv = (lock(&self.var)?.narrow(0, lo, n)? + BN_EPS)?.sqrt()?.recip()?;
        let scale = (g * inv)?;
        let shift = (b - (mean * &scale)?)?;
        let shape = (1, n, 1, 1);
        Ok(x.broadcast_mul(&scale.reshape(shape)?)?.broadcast_add(&shift.reshape(shape)?)?)
    }

    fn update(&self, buf: &Mutex<Tensor>, batch: &Tensor, lo: usize, n: usize) -> Result<()> {
        let mut cur = lock(buf)?;
        let c = cur.dims()[0];
        let old = cur.narrow(0, lo, n)?;
        let new = ((old * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?;
        let mut parts = vec![];
        if lo > 0 {
            parts.push(cur.narrow(0, 0, lo)?);
        }
        parts.push(new);
        if lo + n < c {
            parts.push(cur.narrow(0, lo + n, c - lo - n)?);
        }
        *cur = Tensor::cat(&parts, 0)?;
        Ok(())
    }
}

pub fn lock(m: &Mutex<Tensor>) -> Result<std::sync::MutexGuard<'_, Tensor>> {
    m.lock().map_err(|_| crate::Error::Diverged("a batch-norm buffer lock was poisoned by a failed step".into()))
}

pub struct Linear {
    pub w: Var,
    pub b: Var,
    pub group: Group,
}

impl Linear {
    pub fn new(b: &mut Builder, name: &str, cin: usize, cout: usize, g: Group) -> Result<Self> {
        let v = b.normal(cin * cout, (1.0 / cin as f64).sqrt());
        let w = b.param(format!("{name}.weight"), v, &[cout, cin], g, true)?;
        let bias = b.constant(format!("{name}.bias"), cout, 0.0, g)?;
        Ok(Linear { w, b: bias, group: g })
    }
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let w = ctx.param(&self.w, self.group);
        Ok(x.matmul(&w.t()?)?.broadcast_add(&ctx.param(&self.b, self.group))?)
    }
    pub fn macs(&self) -> u64 {
        self.w.as_tensor().elem_count() as u64
    }
}

/// log-softmax over the last dimension, stable (max subtracted, as a constant).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of logits `[N, K]` against labels `[N]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let picked = lp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// KL(p || q) per batch mean, from log-probabilities, computed in log space so that tiny
/// probabilities never underflow into 0 * log 0 (the failure of AdvMoE's released router KL).
pub fn kl_div(logp: &Tensor, logq: &Tensor) -> Result<Tensor> {
    let n = logp.dims()[0] as f64;
    Ok((logp.exp()? * (logp - logq)?)?.sum_all()?.affine(1.0 / n, 0.0)?)
}
