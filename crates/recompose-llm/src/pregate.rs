//! Read-ME's pre-gating router as the model runs it: one decoder block with the backbone's own
//! attention geometry (its query and KV heads, head size and RoPE) and a narrow SiLU-gated MLP,
//! over the backbone's token embeddings, then a linear head to the experts. It runs before the
//! blocks and picks every token's expert for all of them, so each block knows its routes before
//! it runs. Its keys and values live in the step's caches as one more layer after the
//! backbone's: every cache policy, packed serving steps and the prefix cache carry it as they
//! carry any layer, and the router costs one small block per token, not a pass over the context.

use crate::error::{Error, Result};
use crate::ffn::DenseFfn;
use crate::linear::Linear;
use crate::lora::{mix, normal};
use crate::model::Attention;
use candle_core::{DType, Device, Tensor, Var};
use recompose_core::config::{Activation, ModelConfig};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a router is beyond the backbone's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreGateConfig {
    pub experts: usize,
    /// The MLP's inner width.
    pub ffn: usize,
}

impl PreGateConfig {
    pub fn validate(&self) -> Result<()> {
        if self.experts < 2 || self.experts > 64 || self.ffn == 0 {
            return Err(Error::InvalidInput(format!(
                "router: {} experts (2 to 64) and an MLP of width {} (at least 1)",
                self.experts, self.ffn
            )));
        }
        Ok(())
    }
}

/// The router's tensors by name, with their shapes for a backbone of config `c`.
pub fn shapes(config: &PreGateConfig, c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, config.ffn);
    [
        ("attn_norm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![q, h]),
        ("self_attn.k_proj.weight", vec![kv, h]),
        ("self_attn.v_proj.weight", vec![kv, h]),
        ("self_attn.o_proj.weight", vec![h, q]),
        ("mlp_norm.weight", vec![h]),
        ("mlp.gate_proj.weight", vec![f, h]),
        ("mlp.up_proj.weight", vec![f, h]),
        ("mlp.down_proj.weight", vec![h, f]),
        ("norm.weight", vec![h]),
        ("head.weight", vec![config.experts, h]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("router.{n}"), s))
    .collect()
}

pub struct PreGate {
    pub config: PreGateConfig,
    pub(crate) attn_norm: Tensor,
    pub(crate) attn: Attention,
    pub(crate) mlp_norm: Tensor,
    pub(crate) mlp: DenseFfn,
    pub(crate) norm: Tensor,
    pub(crate) head: Linear,
    /// The tensors in [`shapes`] order (`Var`s when trainable).
    tensors: Vec<(String, Tensor)>,
    vars: Vec<(String, Var)>,
    /// Nanoseconds spent routing since the router was made (its share of step time).
    nanos: AtomicU64,
}

impl PreGate {
    /// A router from its tensors, fetched by name and shape through `get` (checked here);
    /// `trainable` makes them `Var`s.
    pub fn from_tensors(
        config: PreGateConfig,
        c: &ModelConfig,
        trainable: bool,
        mut get: impl FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let mut tensors = vec![];
        let mut vars = vec![];
        for (name, shape) in shapes(&config, c) {
            let t = get(&name)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::InvalidInput(format!(
                    "{name} is {:?}, a router of this config for this model needs {shape:?}",
                    t.dims()
                )));
            }
            let t = if trainable {
                let v = Var::from_tensor(&t)?;
                vars.push((name.clone(), v.clone()));
                v.as_tensor().clone()
            } else {
                t
            };
            tensors.push((name, t));
        }
        let t = |i: usize| tensors[i].1.clone();
        let lin = |i: usize| Linear::dense(tensors[i].0.clone(), t(i));
        let attn = Attention::plain(lin(1), lin(2), lin(3), lin(4), c.num_heads, c.num_kv_heads);
        let mlp = DenseFfn { gate: lin(6), up: lin(7), down: lin(8), activation: Activation::Silu };
        Ok(Self {
            config,
            attn_norm: t(0),
            attn,
            mlp_norm: t(5),
            mlp,
            norm: t(9),
            head: lin(10),
            tensors,
            vars,
            nanos: AtomicU64::new(0),
        })
    }

    /// A fresh trainable router, seeded: matrices normal with std 0.02, norms ones.
    pub fn init(config: PreGateConfig, c: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let shapes = shapes(&config, c);
        Self::from_tensors(config, c, true, |name| {
            let (i, (_, shape)) = shapes
                .iter()
                .enumerate()
                .find(|(_, (n, _))| n == name)
                .ok_or_else(|| Error::InvalidInput(format!("{name}: not a router tensor")))?;
            let t = if shape.len() == 1 {
                Tensor::ones(shape[0], dtype, device)?
            } else {
                let n = shape.iter().product::<usize>() as u64;
                let v: Vec<f64> = (0..n).map(|j| 0.02 * normal(seed ^ mix(i as u64 + 1), j)).collect();
                Tensor::from_vec(v, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            Ok(t)
        })
    }

    /// A frozen copy (plain tensors, no gradients tracked), for running what was trained.
    pub fn frozen(&self, c: &ModelConfig) -> Result<Self> {
        self.to(c, self.attn_norm.dtype(), self.attn_norm.device())
    }

    /// A frozen copy in `dtype` on `device` (a router read from a file, put into a model).
    pub fn to(&self, c: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_tensors(self.config, c, false, |name| {
            let t = self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.detach());
            let t = t.ok_or_else(|| Error::InvalidInput(format!("router: no {name}")))?;
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        })
    }

    /// The router on the packed kernels (its matrices requantised to Q8_0), for a model that
    /// runs packed: in f32 the router reads about a tenth of a 135M model's bytes per token.
    /// Matrices whose width is not a multiple of 32 stay f32; the saved tensors stay as they were.
    pub fn packed(mut self) -> Result<Self> {
        let q8 = |l: &mut Linear| -> Result<()> {
            let Some(w) = l.dense_weight() else { return Ok(()) };
            let (r, c) = w.dims2()?;
            let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(p) = crate::kernels::quant::PackedWeight::q8_0_from_f32(&v, r, c) {
                *l = Linear::packed(l.name.clone(), std::sync::Arc::new(p));
            }
            Ok(())
        };
        let a = &mut self.attn;
        for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut self.mlp.gate, &mut self.mlp.up, &mut self.mlp.down] {
            q8(l)?;
        }
        q8(&mut self.head)?;
        Ok(self)
    }

    /// The router's tensors by name (what a router file holds).
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// Its trainable parameters (empty unless made trainable).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Seconds spent routing so far.
    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    pub(crate) fn add_time(&self, d: std::time::Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl crate::Model {
    /// Puts a router in front of the blocks (or takes it away), returning the one it replaces.
    /// Caches made before this have the wrong number of layers: make them after.
    pub fn set_pregate(&mut self, g: Option<PreGate>) -> Option<PreGate> {
        std::mem::replace(&mut self.pregate, g)
    }

    pub fn pregate(&self) -> Option<&PreGate> {
        self.pregate.as_ref()
    }

    /// Seconds spent routing so far: the pre-gate's and every layer's own gates'.
    pub fn routing_seconds(&self) -> f64 {
        self.pregate.as_ref().map_or(0.0, PreGate::seconds)
            + self.layers.iter().map(|b| b.ffn.routing_seconds()).sum::<f64>()
    }

    /// With a router and no routes from the caller (oracle routes, evaluation), `plan` with the
    /// router's pick for every token of the step; None otherwise. Runs after the caches began
    /// the step, before the first block.
    pub(crate) fn routed(
        &self,
        x: &Tensor,
        shape: crate::model::StepShape,
        caches: &mut [&mut dyn crate::KvCache],
        plan: &crate::Plan,
    ) -> Result<Option<crate::Plan>> {
        match &self.pregate {
            Some(g) if plan.routes.is_none() => {
                let routes = self.pregate_routes(g, x, shape, caches)?;
                Ok(Some(crate::Plan { routes: Some(vec![routes]), ..plan.clone() }))
            }
            _ => Ok(None),
        }
    }

    /// Each token's expert: the argmax of the router's logits, timed.
    pub(crate) fn pregate_routes(
        &self,
        g: &PreGate,
        x: &Tensor,
        shape: crate::model::StepShape,
        caches: &mut [&mut dyn crate::KvCache],
    ) -> Result<Vec<u32>> {
        let t0 = std::time::Instant::now();
        let routes = self.pregate_logits(g, &x.detach(), shape, caches)?.argmax(candle_core::D::Minus1)?.to_vec1()?;
        g.add_time(t0.elapsed());
        Ok(routes)
    }

    /// The router's expert logits `(B * T, experts)` from the embeddings `x (B, T, hidden)`; its
    /// attention runs as cache layer `layers.len()`.
    fn pregate_logits(
        &self,
        g: &PreGate,
        x: &Tensor,
        shape: crate::model::StepShape,
        caches: &mut [&mut dyn crate::KvCache],
    ) -> Result<Tensor> {
        let eps = self.config.rms_eps;
        let (b, t, hid) = x.dims3()?;
        let h = crate::grad::rms_norm(x, &g.attn_norm, eps)?;
        let a = self.attention(self.layers.len(), &g.attn, &h, shape, caches, &crate::Plan::default(), None)?;
        let x = (x + a)?.reshape((b * t, hid))?;
        let m = crate::grad::rms_norm(&x, &g.mlp_norm, eps)?;
        let x = (&x + g.mlp.down.forward(&g.mlp.hidden(&m, None, None)?)?)?;
        g.head.forward(&crate::grad::rms_norm(&x, &g.norm, eps)?)
    }

    /// The router's logits `(rows * t, experts)` over a batch, differentiable in the router's
    /// weights (the backbone's embeddings it reads stay frozen): what router training takes.
    pub fn route_logits(&self, batch: &crate::Batch) -> Result<Tensor> {
        let g = self.pregate.as_ref().ok_or_else(|| Error::InvalidInput("the model has no router".into()))?;
        let step = crate::Step { start: vec![0; batch.rows], lens: vec![batch.t; batch.rows], t: batch.t };
        let x = self.embed(&batch.tokens)?.detach().reshape((batch.rows, batch.t, self.config.hidden_size))?;
        let mut cache = crate::StepCache::new(batch.rows, self.dtype, &self.device);
        let caches: &mut [&mut dyn crate::KvCache] = &mut [&mut cache];
        caches[0].begin_step(&step)?;
        let logits = self.pregate_logits(g, &x, crate::model::StepShape::Padded(&step), caches)?;
        caches[0].end_step()?;
        Ok(logits)
    }

    /// The router's picks for `tokens`, the next tokens of one sequence whose router keys and
    /// values `cache` (batch 1, of [`crate::Model::cache_layers`] layers, only the router's
    /// used) holds so far: a server routes a sequence ahead of the backbone with this, and
    /// runs the backbone later with the routes given.
    pub fn route_ahead(&self, tokens: &[u32], cache: &mut dyn crate::KvCache) -> Result<Vec<u32>> {
        let g = self.pregate.as_ref().ok_or_else(|| Error::InvalidInput("the model has no router".into()))?;
        if tokens.is_empty() {
            return Ok(vec![]);
        }
        let n = tokens.len();
        let step = crate::Step { start: vec![cache.seq_len(0)], lens: vec![n], t: n };
        let x = self.embed(tokens)?.reshape((1, n, self.config.hidden_size))?;
        let caches: &mut [&mut dyn crate::KvCache] = &mut [cache];
        caches[0].begin_step(&step)?;
        let routes = self.pregate_routes(g, &x, crate::model::StepShape::Padded(&step), caches)?;
        caches[0].end_step()?;
        Ok(routes)
    }

    /// Tells every FFN the experts of the steps after the current one (see
    /// [`crate::ffn::Ffn::upcoming`]).
    pub fn upcoming(&self, steps: &[Vec<u32>]) {
        for b in &self.layers {
            b.ffn.upcoming(steps);
        }
    }

    /// The router's pick for every token of one row (as the runtime makes it, in one step).
    pub fn routes(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        let batch = crate::Batch::from_rows(&[(tokens.to_vec(), tokens.to_vec())], 0)?;
        Ok(self.route_logits(&batch)?.argmax(candle_core::D::Minus1)?.to_vec1()?)
    }
}
