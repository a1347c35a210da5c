//! The pre-gating router (Read-ME): one small causal transformer that reads the tokens before
//! the backbone runs and picks each token's expert for every layer. Its input is the backbone's
//! own token embedding (read from the backbone, not copied, and frozen); then one pre-norm
//! block (causal multi-head attention, a SiLU-gated MLP, no positions) and a linear head to the
//! experts. Trained by distillation towards each token's oracle expert (`oracle`), with AdamW.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use recompose_llm::grad;
use recompose_llm::lora::mix;
use recompose_train::{Optimizer, OptimizerKind, Param};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouterConfig {
    /// The backbone's hidden size (the embedding the router reads).
    pub hidden: usize,
    pub heads: usize,
    /// The MLP's inner width.
    pub ffn: usize,
    pub experts: usize,
}

impl RouterConfig {
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 || self.heads == 0 || !self.hidden.is_multiple_of(self.heads) || self.ffn == 0 {
            return Err(Error::Config(format!(
                "router: hidden {} must split into {} heads, MLP width {} at least 1",
                self.hidden, self.heads, self.ffn
            )));
        }
        if self.experts < 2 {
            return Err(Error::Config(format!("router: {} experts, at least two", self.experts)));
        }
        Ok(())
    }
}

pub struct Router {
    pub config: RouterConfig,
    /// In order: attention norm, q, k, v, o, MLP norm, gate, up, down, final norm, head.
    params: Vec<Param>,
}

const NAMES: [&str; 11] = [
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "mlp_norm",
    "gate_proj",
    "up_proj",
    "down_proj",
    "norm",
    "head",
];

impl Router {
    /// Seeded initialisation: matrices normal with std 0.02, norms ones.
    pub fn init(config: RouterConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let RouterConfig { hidden: d, ffn: f, experts: e, .. } = config;
        let shapes: [(usize, usize); 11] =
            [(1, d), (d, d), (d, d), (d, d), (d, d), (1, d), (f, d), (f, d), (d, f), (1, d), (e, d)];
        let params = NAMES
            .iter()
            .zip(shapes)
            .enumerate()
            .map(|(pi, (name, (r, c)))| {
                let t = if r == 1 {
                    Tensor::ones(c, dtype, device)?
                } else {
                    let v: Vec<f64> = (0..r * c).map(|i| 0.02 * normal(seed ^ mix(pi as u64 + 1), i as u64)).collect();
                    Tensor::from_vec(v, (r, c), device)?.to_dtype(dtype)?
                };
                Ok(Param::new(format!("router.{name}"), Var::from_tensor(&t)?, r > 1, "router"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, params })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    fn w(&self, i: usize) -> &Tensor {
        self.params[i].var.as_tensor()
    }

    /// Expert logits `(B, T, experts)` from the backbone's embeddings `x (B, T, hidden)`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = self.config.heads;
        let dh = d / h;
        // Rows flattened to `(B*T, D)` for the norms and projections; attention per row.
        let lin = |x: &Tensor, i: usize| -> Result<Tensor> { Ok(x.matmul(&self.w(i).t()?)?) };
        let x = x.reshape((b * t, d))?;
        let a = grad::rms_norm(&x, self.w(0), 1e-6)?;
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (heads(lin(&a, 1)?)?, heads(lin(&a, 2)?)?, heads(lin(&a, 3)?)?);
        let o = grad::causal_attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), None)?;
        let o = o.transpose(1, 2)?.reshape((b * t, d))?;
        let x = (x + lin(&o, 4)?)?;
        let m = grad::rms_norm(&x, self.w(5), 1e-6)?;
        let g = grad::gated(&lin(&m, 6)?, &lin(&m, 7)?, recompose_core::config::Activation::Silu)?;
        let x = (x + lin(&g, 8)?)?;
        Ok(lin(&grad::rms_norm(&x, self.w(9), 1e-6)?, 10)?.reshape((b, t, self.config.experts))?)
    }

    /// `sum` of the cross-entropy of `targets` (one expert per token, row-major over `(B, T)`).
    pub fn loss(&self, x: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let logits = self.logits(x)?.reshape((b * t, self.config.experts))?;
        Ok(grad::cross_entropy(&logits, targets, 1.0)?)
    }

    /// Each token's expert for embeddings `x (1, T, hidden)`.
    pub fn route(&self, x: &Tensor) -> Result<Vec<u32>> {
        Ok(self.logits(&x.detach())?.squeeze(0)?.argmax(D::Minus1)?.to_vec1()?)
    }
}

impl Router {
    /// Writes the router as one safetensors file at `path` (built beside it, renamed into place):
    /// its weights as f32, its config and `backbone` (the identity of the model whose embeddings
    /// it reads) in the metadata.
    pub fn save(&self, path: &std::path::Path, backbone: &str) -> Result<()> {
        let tmp = recompose_core::atomic::scratch_beside(path)?;
        let values: Vec<Tensor> =
            self.params.iter().map(|p| p.var.as_tensor().to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        let plan: Vec<recompose_core::safetensors_out::PlannedTensor> = self
            .params
            .iter()
            .zip(&values)
            .map(|(p, t)| recompose_core::safetensors_out::PlannedTensor {
                name: p.name.clone(),
                dtype: DType::F32,
                shape: t.dims().to_vec(),
            })
            .collect();
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("recompose.router".to_string(), serde_json::to_string(&self.config).unwrap_or_default());
        meta.insert("recompose.backbone".to_string(), backbone.to_string());
        let written = recompose_core::safetensors_out::write_sharded(tmp.path(), &plan, usize::MAX, &meta, |i| {
            Ok(values[i].clone())
        })?;
        let file = written.first().ok_or_else(|| Error::Data("the router file was not written".into()))?;
        std::fs::rename(file, path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        Ok(())
    }

    /// Reads a router [`Router::save`] wrote, refusing one made for another backbone than
    /// `backbone` or whose tensors do not fit its config.
    pub fn load(path: &std::path::Path, backbone: &str) -> Result<Self> {
        let st = recompose_core::weights::HfDir::open_tensors(path)?;
        let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
        let config: RouterConfig = st
            .metadata
            .get("recompose.router")
            .and_then(|c| serde_json::from_str(c).ok())
            .ok_or_else(|| bad("not a recompose router (no router config in its metadata)".into()))?;
        config.validate()?;
        match st.metadata.get("recompose.backbone") {
            Some(b) if b == backbone => {}
            Some(b) => return Err(bad(format!("a router for another model (made for {b}, this model is {backbone})"))),
            None => return Err(bad("no backbone identity in its metadata".into())),
        }
        let fresh = Router::init(config, 0, DType::F32, &Device::Cpu)?;
        for p in &fresh.params {
            let t = st.load(&p.name)?.to_dtype(DType::F32)?;
            if t.dims() != p.var.as_tensor().dims() {
                return Err(bad(format!(
                    "{} is {:?}, the config needs {:?}",
                    p.name,
                    t.dims(),
                    p.var.as_tensor().dims()
                )));
            }
            p.var.set(&t)?;
        }
        Ok(fresh)
    }
}

/// The `i`-th standard normal of stream `seed` (Box-Muller over two hashed uniforms).
fn normal(seed: u64, i: u64) -> f64 {
    let u = |j: u64| ((mix(seed ^ mix(j)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-2.0 * u(2 * i).ln()).sqrt() * (2.0 * std::f64::consts::PI * u(2 * i + 1)).cos()
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

/// Trains `router` for `opts.steps` AdamW steps on rows of embeddings `xs[i] (T, hidden)` (all
/// rows the same length) with one target expert per token; `progress(step, mean loss)` after
/// each step. Returns the mean loss per target of every step.
pub fn train(
    router: &mut Router,
    xs: &[Tensor],
    targets: &[Vec<u32>],
    opts: TrainOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<Vec<f64>> {
    if xs.is_empty() || xs.len() != targets.len() || opts.batch == 0 || !(opts.lr > 0.0) {
        return Err(Error::Config(format!(
            "router training: {} rows, {} target rows, batch {}, lr {}",
            xs.len(),
            targets.len(),
            opts.batch,
            opts.lr
        )));
    }
    let params = router.params.clone();
    let mut opt = Optimizer::new(OptimizerKind::adamw(0.01), &params)?;
    let mut order = recompose_train::data::Order::new(opts.seed, xs.len());
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let rows: Vec<usize> = (0..opts.batch.min(xs.len())).map(|i| order.row(step * opts.batch + i)).collect();
        let x = Tensor::stack(&rows.iter().map(|&r| xs[r].clone()).collect::<Vec<_>>(), 0)?;
        let tgt: Vec<u32> = rows.iter().flat_map(|&r| targets[r].iter().copied()).collect();
        let loss = router.loss(&x, &tgt)?;
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
        opt.step(&params, &g, opts.lr, &|_| true)?;
        let mean = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / tgt.len().max(1) as f64;
        losses.push(mean);
        progress(step + 1, mean);
    }
    Ok(losses)
}
