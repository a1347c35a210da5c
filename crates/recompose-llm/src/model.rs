//! The decoder: Llama-family blocks (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings) and Gemma 3's
//! variant (QK-norm, sandwich norms, sliding-window layers with their own RoPE base, scaled
//! embeddings, GELU). Weights are read by HF name from a `ModelFile`; attention talks to a
//! `KvCache`, the MLP is an `Ffn`. Owns no sampling and no cache policy.

use crate::attention::Kernel;
use crate::error::{Error, Result};
use crate::ffn::{DenseFfn, Ffn, FfnContext};
use crate::grad;
use crate::kernels::quant::PackedWeight;
use crate::kv::{CacheLayout, FullCache, KvCache, KvView, Step};
use crate::linear::Linear;
use crate::rope::Rope;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use recompose_core::config::{Arch, ModelConfig};
use recompose_core::weights::ModelFile;
use std::sync::Arc;

/// Which weight form the model computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// Quantised blocks as stored (fast path); f32 for unquantised files.
    #[default]
    Quantized,
    /// Everything dequantised to f32 (the exact reference path, and the trainable one).
    F32,
}

/// Which weights load as trainable candle `Var`s (the rest stay frozen tensors).
#[derive(Default)]
pub enum Trainable {
    #[default]
    None,
    All,
    /// Those whose HF name the predicate accepts.
    Matching(Box<dyn Fn(&str) -> bool + Send + Sync>),
}

impl Trainable {
    fn includes(&self, name: &str) -> bool {
        match self {
            Trainable::None => false,
            Trainable::All => true,
            Trainable::Matching(f) => f(name),
        }
    }
}

/// How a model is loaded: weight form, device, float type, what is trainable. One loading path
/// serves inference and training, as candle's `VarBuilder` does.
pub struct LoadOptions {
    pub mode: WeightMode,
    pub device: Device,
    /// F32, or F64 (finite-difference tests); the quantised path is f32 only.
    pub dtype: DType,
    pub trainable: Trainable,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { mode: WeightMode::Quantized, device: Device::Cpu, dtype: DType::F32, trainable: Trainable::None }
    }
}

impl LoadOptions {
    pub fn new(mode: WeightMode) -> Self {
        Self { mode, ..Default::default() }
    }
}

enum Embedding {
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

pub(crate) struct Attention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    /// Attention without QK-norms (the pre-gating router's).
    pub(crate) fn plain(q: Linear, k: Linear, v: Linear, o: Linear, heads: usize, kv_heads: usize) -> Self {
        Self { q, k, v, o, q_norm: None, k_norm: None, heads, kv_heads }
    }
}

pub struct Block {
    attn_norm: Tensor,
    pub(crate) attn: Attention,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    post_ffn_norm: Option<Tensor>,
    pub ffn: Box<dyn Ffn>,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Each row's last real token: `(B, vocab)`.
    Last,
    /// Every column: `(B, T, vocab)`.
    All,
    /// Columns from this index on: `(B, T - from, vocab)` (perplexity skips the context part).
    From(usize),
}

/// Decisions made before the backbone runs, handed to the layers' seams. The default runs the
/// whole dense model.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The expert of every token (`B x T`, row-major) per layer, or one list for all layers.
    pub routes: Option<Vec<Vec<u32>>>,
    /// Per layer, per sequence: the active FFN channels (a prefix).
    pub ffn_widths: Option<Vec<Vec<usize>>>,
    /// Per layer: the active KV heads (a prefix, with their query-head groups).
    pub kv_heads: Option<Vec<usize>>,
    /// Set while training: the seed of this step's dropout masks.
    pub dropout_seed: Option<u64>,
}

impl Plan {
    fn route(&self, layer: usize) -> Option<&[u32]> {
        let r = self.routes.as_ref()?;
        r.get(if r.len() == 1 { 0 } else { layer }).map(Vec::as_slice)
    }

    fn check(&self, c: &ModelConfig, batch: usize, t: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        if let Some(r) = &self.routes {
            if r.len() != 1 && r.len() != c.num_layers {
                return bad(format!("routes for {} layers, the model has {}", r.len(), c.num_layers));
            }
            if let Some(l) = r.iter().find(|l| l.len() != batch * t) {
                return bad(format!("{} routes for a {batch} x {t} step", l.len()));
            }
        }
        if let Some(w) = &self.ffn_widths {
            if w.len() != c.num_layers {
                return bad(format!("FFN widths for {} layers, the model has {}", w.len(), c.num_layers));
            }
        }
        if let Some(h) = &self.kv_heads {
            if h.len() != c.num_layers {
                return bad(format!("KV heads for {} layers, the model has {}", h.len(), c.num_layers));
            }
            for (l, &n) in h.iter().enumerate() {
                if n == 0 || n > c.dims(l).kv_heads {
                    return bad(format!("layer {l}: {n} active KV heads, it has {}", c.dims(l).kv_heads));
                }
            }
        }
        Ok(())
    }
}

/// What a layer's FFN handed back besides its output.
#[derive(Default)]
pub struct FfnSide {
    pub aux_loss: Option<Tensor>,
    pub usage: Option<Vec<u64>>,
}

/// A forward pass's logits and the FFNs' side outputs, one entry per layer.
pub struct Output {
    pub logits: Tensor,
    pub ffn: Vec<FfnSide>,
}

pub struct Model {
    pub config: ModelConfig,
    embed: Embedding,
    pub layers: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    rope_global: Arc<Rope>,
    rope_local: Arc<Rope>,
    pub mode: WeightMode,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// Trainable parameters by name (weights loaded as `Var`s, LoRA factors), in load order.
    pub(crate) params: Vec<(String, Var)>,
    /// Read-ME's router: when set, it picks every token's expert before the blocks run.
    pub(crate) pregate: Option<crate::pregate::PreGate>,
}

/// Reads weights by HF name, as frozen tensors or trainable `Var`s.
struct Loader<'a> {
    file: &'a ModelFile,
    opts: &'a LoadOptions,
    params: Vec<(String, Var)>,
}

impl Loader<'_> {
    fn packed_allowed(&self, name: &str) -> bool {
        self.opts.mode == WeightMode::Quantized
            && self.opts.device.is_cpu()
            && self.opts.dtype == DType::F32
            && !self.opts.trainable.includes(name)
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.file.f32(name, shape)?.to_dtype(self.opts.dtype)?.to_device(&self.opts.device)?;
        if !self.opts.trainable.includes(name) {
            return Ok(t);
        }
        if self.opts.mode == WeightMode::Quantized && self.file.quantized(name)?.is_some() {
            return Err(Error::NoGradient(format!(
                "{name} is quantised: trainable weights need the f32 path (WeightMode::F32)"
            )));
        }
        let v = Var::from_tensor(&t)?;
        self.params.push((name.to_string(), v.clone()));
        Ok(v.as_tensor().clone())
    }

    fn linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear> {
        if self.packed_allowed(name) {
            if let Some(m) = self.file.quantized(name)? {
                let dtype = m.info.dtype;
                if m.info.shape != shape {
                    return Err(recompose_core::Error::BadTensor {
                        path: self.file.path.clone(),
                        tensor: name.into(),
                        what: format!("shape {:?}, expected {:?}", m.info.shape, shape),
                    }
                    .into());
                }
                let packed = match dtype {
                    GgmlDType::Q5_0 => crate::linear::q5_0_as_q8_0(m.bytes())
                        .and_then(|b| PackedWeight::from_ggml(GgmlDType::Q8_0, &b, shape[0], shape[1])),
                    GgmlDType::Q4K => crate::linear::q4_k_as_q4_1(m.bytes())
                        .and_then(|b| PackedWeight::from_ggml(GgmlDType::Q4_1, &b, shape[0], shape[1])),
                    _ => PackedWeight::from_ggml(dtype, m.bytes(), shape[0], shape[1]),
                };
                if let Some(p) = packed {
                    return Ok(Linear::packed(name, Arc::new(p)));
                }
                // Other types (Q6_K, Q2_K, ...) run dequantised: candle's K-quant matmul is several
                // times slower than f32 on these CPUs (measured: gemma3 decode 12 vs 63 tok/s).
            }
        }
        Ok(Linear::dense(name, self.tensor(name, &shape)?))
    }
}

impl Model {
    pub fn load(file: &ModelFile, mode: WeightMode) -> Result<Self> {
        Self::load_with(file, LoadOptions::new(mode))
    }

    pub fn load_with(file: &ModelFile, opts: LoadOptions) -> Result<Self> {
        if !matches!(opts.dtype, DType::F32 | DType::F64) {
            return Err(Error::InvalidInput(format!("models compute in f32 or f64, not {:?}", opts.dtype)));
        }
        let c = file.config.clone();
        let h = c.hidden_size;
        let mut ld = Loader { file, opts: &opts, params: vec![] };
        let emb_name = "model.embed_tokens.weight";
        let packed_embed = match (ld.packed_allowed(emb_name), file.quantized(emb_name)?) {
            (true, Some(m)) => PackedWeight::from_ggml(m.info.dtype, m.bytes(), c.vocab_size, h).map(Arc::new),
            _ => None,
        };
        let (embed, tied_head) = match packed_embed {
            Some(p) => (Embedding::Packed(p.clone()), Linear::packed(emb_name, p)),
            None => {
                let t = ld.tensor(emb_name, &[c.vocab_size, h])?;
                let head = if ld.packed_allowed(emb_name) && file.quantized(emb_name)?.is_some() {
                    ld.linear(emb_name, [c.vocab_size, h])?
                } else {
                    Linear::dense(emb_name, t.clone())
                };
                (Embedding::Dense(t), head)
            }
        };
        let lm_head =
            if file.has("lm_head.weight") { ld.linear("lm_head.weight", [c.vocab_size, h])? } else { tied_head };
        let gemma = c.arch == Arch::Gemma3;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let dims = c.dims(l);
            let (qd, kvd, i) = (dims.heads * c.head_dim, dims.kv_heads * c.head_dim, dims.intermediate);
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let attn = Attention {
                q: ld.linear(&p("self_attn.q_proj.weight"), [qd, h])?,
                k: ld.linear(&p("self_attn.k_proj.weight"), [kvd, h])?,
                v: ld.linear(&p("self_attn.v_proj.weight"), [kvd, h])?,
                o: ld.linear(&p("self_attn.o_proj.weight"), [h, qd])?,
                q_norm: if gemma { Some(ld.tensor(&p("self_attn.q_norm.weight"), &[c.head_dim])?) } else { None },
                k_norm: if gemma { Some(ld.tensor(&p("self_attn.k_norm.weight"), &[c.head_dim])?) } else { None },
                heads: dims.heads,
                kv_heads: dims.kv_heads,
            };
            let ffn = DenseFfn {
                gate: ld.linear(&p("mlp.gate_proj.weight"), [i, h])?,
                up: ld.linear(&p("mlp.up_proj.weight"), [i, h])?,
                down: ld.linear(&p("mlp.down_proj.weight"), [h, i])?,
                activation: c.activation,
            };
            let (ffn_norm_name, post_attn, post_ffn) = if gemma {
                (
                    "pre_feedforward_layernorm.weight",
                    Some(ld.tensor(&p("post_attention_layernorm.weight"), &[h])?),
                    Some(ld.tensor(&p("post_feedforward_layernorm.weight"), &[h])?),
                )
            } else {
                ("post_attention_layernorm.weight", None, None)
            };
            layers.push(Block {
                attn_norm: ld.tensor(&p("input_layernorm.weight"), &[h])?,
                attn,
                post_attn_norm: post_attn,
                ffn_norm: ld.tensor(&p(ffn_norm_name), &[h])?,
                post_ffn_norm: post_ffn,
                ffn: Box::new(ffn),
            });
        }
        let norm = ld.tensor("model.norm.weight", &[h])?;
        let params = ld.params;
        let rope_global = Arc::new(Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling, c.rope_style));
        let rope_local = Arc::new(Rope::new(
            c.head_dim,
            c.rope_theta_local,
            &recompose_core::config::RopeScaling::None,
            c.rope_style,
        ));
        Ok(Self {
            config: c,
            embed,
            layers,
            norm,
            lm_head,
            rope_global,
            rope_local,
            mode: opts.mode,
            device: opts.device,
            dtype: opts.dtype,
            params,
            pregate: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A full cache sized for this model.
    pub fn new_cache(&self, batch: usize) -> FullCache {
        FullCache::new(self.cache_layers(), batch, self.config.max_position).on(&self.device)
    }

    /// Layers a cache holds: the blocks', and the router's after them when there is one.
    pub fn cache_layers(&self) -> usize {
        self.layers.len() + usize::from(self.pregate.is_some())
    }

    /// Whether cache layer `li` is a sliding-window one (the router's never is).
    fn sliding(&self, li: usize) -> bool {
        li < self.layers.len() && self.config.is_sliding(li)
    }

    /// The facts a cache policy is built from.
    pub fn cache_layout(&self) -> CacheLayout {
        let c = &self.config;
        let layers = self.cache_layers();
        CacheLayout {
            num_layers: layers,
            num_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_len: c.max_position,
            windows: (0..layers).map(|l| if self.sliding(l) { c.sliding_window } else { None }).collect(),
            ropes: (0..layers)
                .map(|l| if self.sliding(l) { self.rope_local.clone() } else { self.rope_global.clone() })
                .collect(),
            device: self.device.clone(),
        }
    }

    /// The input embeddings of `tokens`, `(N, hidden)`, as the first block receives them
    /// (Read-ME's router reads the backbone's embedding rather than keeping a copy).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let h = self.config.hidden_size;
        let v = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {v}")));
        }
        let x = match &self.embed {
            Embedding::Dense(t) => {
                let ids = Tensor::from_vec(tokens.to_vec(), tokens.len(), &self.device)?;
                t.index_select(&ids, 0)?
            }
            Embedding::Packed(p) => {
                let mut out = vec![0f32; tokens.len() * h];
                for (i, &t) in tokens.iter().enumerate() {
                    p.dequantize_row(t as usize, &mut out[i * h..(i + 1) * h]);
                }
                Tensor::from_vec(out, (tokens.len(), h), &self.device)?
            }
        };
        Ok(match self.config.embed_scale {
            Some(s) => (x * s)?,
            None => x,
        })
    }

    /// Runs one step. `tokens` holds `B x step.t` ids row-major (padding columns may hold any
    /// valid id). Returns logits as asked.
    pub fn forward(&self, tokens: &[u32], step: &Step, cache: &mut dyn KvCache, logits: Logits) -> Result<Tensor> {
        Ok(self.forward_with(tokens, step, &mut [cache], logits, &Plan::default())?.logits)
    }

    /// One step over rows of different lengths laid end to end, each row with its own cache of
    /// batch 1: `tokens` holds row 0's `lens[0]` tokens, then row 1's, and so on, and row r's
    /// first token sits at position `start[r]`. Decode rows (one token) and prefill chunks
    /// (many) run in one forward: projections and FFNs over all `sum(lens)` tokens at once,
    /// attention row by row against each row's cache. `prompt[r]` marks row r's tokens as a
    /// piece of its prompt: those attend through the prefill kernel however few they are, so a
    /// prompt's KV (and a prefix cached from it) is the same to the last bit however the prompt
    /// was cut into pieces. `Logits::Last` gives each row's last token `(rows, vocab)`;
    /// `Logits::All` every token `(1, sum(lens), vocab)`.
    pub fn forward_packed(
        &self,
        tokens: &[u32],
        start: &[usize],
        lens: &[usize],
        prompt: &[bool],
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
    ) -> Result<Tensor> {
        self.forward_packed_routed(tokens, start, lens, prompt, caches, logits, None)
    }

    /// [`Self::forward_packed`] with every token's expert given (`routes`, one per token, in
    /// the packed order) rather than picked by the router in the step: a server that routed
    /// its sequences ahead ([`Self::route_ahead`]) to choose the step by expert. The router's
    /// cache layer then stays empty in `caches`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed_routed(
        &self,
        tokens: &[u32],
        start: &[usize],
        lens: &[usize],
        prompt: &[bool],
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
        routes: Option<Vec<u32>>,
    ) -> Result<Tensor> {
        let n: usize = lens.iter().sum();
        let rows_agree = start.len() == lens.len() && prompt.len() == lens.len() && caches.len() == lens.len();
        if !rows_agree || caches.iter().any(|c| c.batch_size() != 1) {
            return Err(Error::InvalidInput(format!(
                "{} starts, {} lengths, {} prompt flags and {} caches in a packed step (one cache of batch 1 per row)",
                start.len(),
                lens.len(),
                prompt.len(),
                caches.len()
            )));
        }
        if lens.contains(&0) {
            return Err(Error::InvalidInput("every row of a packed step needs at least one token".into()));
        }
        if matches!(logits, Logits::From(_)) {
            return Err(Error::InvalidInput("a packed step gives the last or all logits".into()));
        }
        let rows = Step { start: start.to_vec(), lens: lens.to_vec(), t: lens.iter().copied().max().unwrap_or(0) };
        let whole = Step { start: vec![0], lens: vec![n], t: n };
        let shape = StepShape::Packed { rows: &rows, whole: &whole, prompt };
        let plan = Plan { routes: routes.map(|r| vec![r]), ..Plan::default() };
        Ok(self.run(tokens, shape, caches, logits, &plan)?.logits)
    }

    /// The general step: `caches` holds one cache for every row, or one per row; `plan` sets
    /// the layers' seams (routes, widths, active heads). Returns the logits and the FFNs' side
    /// outputs.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        step: &Step,
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
        plan: &Plan,
    ) -> Result<Output> {
        self.run(tokens, StepShape::Padded(step), caches, logits, plan)
    }

    fn run(
        &self,
        tokens: &[u32],
        shape: StepShape,
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
        plan: &Plan,
    ) -> Result<Output> {
        let c = &self.config;
        let whole = shape.whole();
        let (b, t) = (whole.batch(), whole.t);
        if tokens.len() != b * t || whole.start.len() != b {
            return Err(Error::InvalidInput(format!("{} tokens for a {b} x {t} step", tokens.len())));
        }
        let rows = shape.rows();
        let end = rows.start.iter().zip(&rows.lens).map(|(s, l)| s + l).max().unwrap_or(0);
        if end > c.max_position {
            return Err(Error::ContextOverflow { tokens: end, context: c.max_position });
        }
        plan.check(c, b, t)?;
        if matches!(shape, StepShape::Packed { .. }) && plan.ffn_widths.is_some() {
            return Err(Error::InvalidInput("a packed step takes no FFN widths".into()));
        }
        let mut x = self.embed(tokens)?.reshape((b, t, c.hidden_size))?;
        for_each_cache(caches, shape, |cache, s| cache.begin_step(s))?;
        let routed = self.routed(&x, shape, caches, plan)?;
        let plan = routed.as_ref().unwrap_or(plan);
        let mut side = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let (y, s) = self.block(li, &x, shape, caches, plan)?;
            x = y;
            side.push(s);
        }
        for_each_cache(caches, shape, |cache, _| cache.end_step())?;
        Ok(Output { logits: self.head(&x, shape, logits)?, ffn: side })
    }

    /// One decoder block on `x (B, T, hidden)`.
    pub(crate) fn block(
        &self,
        li: usize,
        x: &Tensor,
        shape: StepShape,
        caches: &mut [&mut dyn KvCache],
        plan: &Plan,
    ) -> Result<(Tensor, FfnSide)> {
        let step = shape.whole();
        let c = &self.config;
        let eps = c.rms_eps;
        let (b, t, hid) = x.dims3()?;
        let layer = &self.layers[li];
        let seed = plan.dropout_seed.map(|s| crate::lora::mix(s ^ crate::lora::mix(li as u64 + 1)));
        let h = grad::rms_norm(x, &layer.attn_norm, eps)?;
        let mut a = self.attention(li, &layer.attn, &h, shape, caches, plan, seed)?;
        if let Some(n) = &layer.post_attn_norm {
            a = grad::rms_norm(&a, n, eps)?;
        }
        let x = (x + a)?;
        let h = grad::rms_norm(&x, &layer.ffn_norm, eps)?;
        let ctx = FfnContext {
            layer: li,
            batch: b,
            t,
            start: &step.start,
            lens: &step.lens,
            route: plan.route(li),
            width: plan.ffn_widths.as_ref().map(|w| w[li].as_slice()),
            dropout_seed: seed.map(|s| s ^ 0xf0f0),
        };
        let out = layer.ffn.forward(&h.reshape((b * t, hid))?, &ctx)?;
        let mut f = out.y.reshape((b, t, hid))?;
        if let Some(n) = &layer.post_ffn_norm {
            f = grad::rms_norm(&f, n, eps)?;
        }
        Ok(((x + f)?, FfnSide { aux_loss: out.aux_loss, usage: out.usage }))
    }

    /// Final norm and LM head on the columns `logits` asks for.
    fn head(&self, x: &Tensor, shape: StepShape, logits: Logits) -> Result<Tensor> {
        let c = &self.config;
        let step = shape.whole();
        let (b, t) = (step.batch(), step.t);
        let x = match (logits, shape) {
            (Logits::Last, StepShape::Packed { rows, .. }) => {
                let idx: Vec<u32> = rows
                    .lens
                    .iter()
                    .scan(0, |end, l| {
                        *end += l;
                        Some(*end as u32 - 1)
                    })
                    .collect();
                let idx = Tensor::from_vec(idx, rows.batch(), &self.device)?;
                x.reshape((t, c.hidden_size))?.index_select(&idx, 0)?
            }
            (logits, _) => match logits {
                Logits::All => x.clone(),
                Logits::From(f) if f < t => x.narrow(1, f, t - f)?,
                Logits::From(f) => {
                    return Err(Error::InvalidInput(format!("logits from column {f} of a {t}-column step")))
                }
                Logits::Last => {
                    let idx: Vec<u32> = (0..b).map(|r| (r * t + step.lens[r].max(1) - 1) as u32).collect();
                    let idx = Tensor::from_vec(idx, b, &self.device)?;
                    x.reshape((b * t, c.hidden_size))?.index_select(&idx, 0)?
                }
            },
        };
        let x = grad::rms_norm(&x, &self.norm, c.rms_eps)?;
        let mut out = self.lm_head.forward(&x)?;
        if let Some(cap) = c.final_logit_softcap {
            out = ((out / cap)?.tanh()? * cap)?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        li: usize,
        at: &Attention,
        x: &Tensor,
        shape: StepShape,
        caches: &mut [&mut dyn KvCache],
        plan: &Plan,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let d = c.head_dim;
        let g = at.heads / at.kv_heads;
        // An elastic sub-network runs a prefix of the KV heads and their query groups.
        let hkv = plan.kv_heads.as_ref().and_then(|h| h.get(li).copied()).unwrap_or(at.kv_heads);
        let hq = hkv * g;
        let s = |k: u64| seed.map(|s| crate::lora::mix(s ^ k));
        let [q, k, v] = crate::linear::forward_group(
            [(&at.q, hq * d, s(11)), (&at.k, hkv * d, s(12)), (&at.v, hkv * d, s(13))],
            x,
        )?;
        let heads = |y: Tensor, h: usize| y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(q, hq)?, heads(k, hkv)?, heads(v, hkv)?);
        let eps = c.rms_eps;
        let q = match &at.q_norm {
            Some(n) => grad::rms_norm(&q, n, eps)?,
            None => q,
        };
        let k = match &at.k_norm {
            Some(n) => grad::rms_norm(&k, n, eps)?,
            None => k,
        };
        let sliding = self.sliding(li);
        let rope = if sliding { &self.rope_local } else { &self.rope_global };
        let window = if sliding { c.sliding_window } else { None };
        let out = match shape {
            StepShape::Padded(step) => {
                let q = rope.apply(&q, &step.start)?;
                let k = rope.apply(&k, &step.start)?;
                // Query heads of a GQA group share their KV head: fold the group into the query axis.
                let q = q.reshape((b, hkv, g * t, d))?;
                if caches.len() == 1 {
                    let view = caches[0].update(li, &k, &v, window)?;
                    self.attend(li, &q, &view, step, Kernel::for_columns(t), &mut *caches[0])?
                } else {
                    let mut outs = Vec::with_capacity(b);
                    for (r, cache) in caches.iter_mut().enumerate() {
                        let (kr, vr) = (k.narrow(0, r, 1)?, v.narrow(0, r, 1)?);
                        let view = cache.update(li, &kr, &vr, window)?;
                        let rs = row_step(shape, r);
                        let kernel = Kernel::for_columns(t);
                        outs.push(self.attend(li, &q.narrow(0, r, 1)?, &view, &rs, kernel, &mut **cache)?);
                    }
                    Tensor::cat(&outs, 0)?
                }
            }
            StepShape::Packed { rows, prompt, .. } => {
                // Rows lie end to end on the column axis: rotate each column at its row's
                // position, then attend row by row over the row's own cache.
                let positions: Vec<usize> =
                    rows.start.iter().zip(&rows.lens).flat_map(|(&s0, &l)| s0..s0 + l).collect();
                let (q, k) = (rope.apply_at(&q, &positions)?, rope.apply_at(&k, &positions)?);
                let mut work = Vec::with_capacity(caches.len());
                let mut off = 0;
                for (r, cache) in caches.iter_mut().enumerate() {
                    let len = rows.lens[r];
                    let (kr, vr) = (k.narrow(2, off, len)?, v.narrow(2, off, len)?);
                    let qr = q.narrow(2, off, len)?.contiguous()?.reshape((1, hkv, g * len, d))?;
                    let view = cache.update(li, &kr, &vr, window)?;
                    work.push((r, qr, view, cache));
                    off += len;
                }
                // Rows attend in parallel: one row has only its few KV heads to spread over the
                // threads, a batch of rows has plenty.
                let outs: Vec<Tensor> = work
                    .into_par_iter()
                    .map(|(r, qr, view, cache)| {
                        // A prompt's every piece runs tiled, so its KV does not depend on how it
                        // was cut (into chunks, or after a cached prefix).
                        let kernel = if prompt[r] { Kernel::Tiled } else { Kernel::for_columns(rows.lens[r]) };
                        let o = self.attend(li, &qr, &view, &row_step(shape, r), kernel, &mut **cache)?;
                        Ok(o.reshape((1, hq, rows.lens[r], d))?)
                    })
                    .collect::<Result<_>>()?;
                Tensor::cat(&outs, 2)?
            }
        };
        let out = out.reshape((b, hq, t, d))?.transpose(1, 2)?.reshape((b, t, hq * d))?;
        at.o.forward_prefix(&out, None, Some(hq * d), s(14))
    }

    /// Attention of queries `(B, Hkv, G*T, D)` over a cache view; `(B, Hkv, G*T, D)` out.
    fn attend(
        &self,
        li: usize,
        q: &Tensor,
        view: &KvView,
        step: &Step,
        kernel: Kernel,
        cache: &mut dyn KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, hkv, gt, _) = q.dims4()?;
        let t = step.t;
        let g = gt / t.max(1);
        let hq = hkv * g;
        let l = view.k.dim(2)?;
        let wants_mass = cache.wants_probs();
        let tracked = q.track_op() || view.k.track_op() || view.v.track_op();
        // On the CPU in f32 without gradients every block runs fused (`attention`: `kernel`);
        // the plain composition serves other devices and autograd.
        let fused = !tracked && q.device().is_cpu() && q.dtype() == DType::F32;
        let out = if let (Some(causal), false) = (view.causal, wants_mass) {
            // The step's own keys under a causal mask: the blocked kernel (with a backward).
            grad::causal_attention(q, &view.k, &view.v, c.attn_scale, causal.window)?
        } else if fused {
            let lens = wants_mass.then_some(step.lens.as_slice());
            let (out, mass) = crate::attention::fused_attention(
                q,
                &view.k,
                &view.v,
                view.mask.as_ref(),
                c.attn_scale as f32,
                t,
                kernel,
                lens,
            )?;
            if let Some(m) = mass {
                cache.observe(li, &m)?;
            }
            out
        } else {
            let scores = (q.matmul(&view.k.t()?)? * c.attn_scale)?;
            let scores = match &view.mask {
                Some(m) => {
                    let m = if m.dtype() == scores.dtype() { m.clone() } else { m.to_dtype(scores.dtype())? };
                    scores.reshape((b, hkv, g, t, l))?.broadcast_add(&m.unsqueeze(2)?)?.reshape((b, hkv, g * t, l))?
                }
                None => scores,
            };
            let probs = grad::softmax_last_dim(&scores)?;
            if wants_mass {
                // Sum over each row's real query columns only, as a matmul with a 0/1 row
                // (a strided sum over the query axis is several times slower).
                let valid: Vec<f32> = (0..b * t).map(|i| if i % t < step.lens[i / t] { 1.0 } else { 0.0 }).collect();
                let valid = Tensor::from_vec(valid, (b, 1, 1, t), q.device())?
                    .to_dtype(probs.dtype())?
                    .broadcast_as((b, hq, 1, t))?;
                let mass = valid.contiguous()?.matmul(&probs.detach().reshape((b, hq, t, l))?)?.squeeze(2)?;
                cache.observe(li, &mass)?;
            }
            probs.matmul(&view.v.contiguous()?)? // (b, hkv, g*t, d)
        };
        Ok(out)
    }
}

/// How a step's tokens sit in the layers' input.
#[derive(Clone, Copy)]
pub(crate) enum StepShape<'a> {
    /// `B x T`, right-padded: one cache for all rows, or one per row.
    Padded(&'a Step),
    /// Rows of different lengths end to end in one `1 x N` run, one cache per row: row r's
    /// `rows.lens[r]` tokens start at position `rows.start[r]`. `whole` is the `1 x N` step
    /// the FFNs see. `prompt[r]`: row r's tokens are a piece of its prompt.
    Packed { rows: &'a Step, whole: &'a Step, prompt: &'a [bool] },
}

impl<'a> StepShape<'a> {
    /// The step as the layers' input is shaped.
    fn whole(self) -> &'a Step {
        match self {
            StepShape::Padded(s) => s,
            StepShape::Packed { whole, .. } => whole,
        }
    }

    /// Where each sequence starts and how many tokens it brings.
    fn rows(self) -> &'a Step {
        match self {
            StepShape::Padded(s) => s,
            StepShape::Packed { rows, .. } => rows,
        }
    }
}

/// Row `r` of a step, for that row's own cache.
fn row_step(shape: StepShape, r: usize) -> Step {
    match shape {
        StepShape::Padded(step) => Step { start: vec![step.start[r]], lens: vec![step.lens[r]], t: step.t },
        StepShape::Packed { rows, .. } => {
            Step { start: vec![rows.start[r]], lens: vec![rows.lens[r]], t: rows.lens[r] }
        }
    }
}

/// Calls `f` on the one shared cache with the whole step, or on each row's cache with its row.
fn for_each_cache(
    caches: &mut [&mut dyn KvCache],
    shape: StepShape,
    mut f: impl FnMut(&mut dyn KvCache, &Step) -> Result<()>,
) -> Result<()> {
    if let (StepShape::Padded(step), 1) = (shape, caches.len()) {
        return f(&mut *caches[0], step);
    }
    for (r, cache) in caches.iter_mut().enumerate() {
        f(&mut **cache, &row_step(shape, r))?;
    }
    Ok(())
}

/// Shapes the step for a batch of token rows of different lengths, starting where `cache` is.
pub fn step_for(rows: &[Vec<u32>], cache: &dyn KvCache, pad: u32) -> (Vec<u32>, Step) {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut tokens = Vec::with_capacity(rows.len() * t);
    for r in rows {
        tokens.extend_from_slice(r);
        tokens.extend(std::iter::repeat_n(pad, t - r.len()));
    }
    let step = Step {
        start: (0..rows.len()).map(|b| cache.seq_len(b)).collect(),
        lens: rows.iter().map(Vec::len).collect(),
        t,
    };
    (tokens, step)
}

impl Model {
    /// Prefills rows of different lengths in chunks of `chunk` columns (bounded attention
    /// buffers for long prompts; the cache policy may ask for shorter ones) and returns each
    /// row's last-token logits `(B, vocab)`. Tells the cache when the prompt is in.
    pub fn prefill(&self, rows: &[Vec<u32>], cache: &mut dyn KvCache, chunk: usize) -> Result<Tensor> {
        let chunk = cache.prefill_chunk().map_or(chunk, |c| c.min(chunk)).max(1);
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Err(Error::InvalidInput("nothing to prefill".into()));
        }
        let mut last: Vec<Option<Tensor>> = vec![None; rows.len()];
        let mut start = 0;
        while start < longest {
            let pieces: Vec<Vec<u32>> =
                rows.iter().map(|r| r[start.min(r.len())..(start + chunk).min(r.len())].to_vec()).collect();
            let (tokens, step) = step_for(&pieces, cache, 0);
            let logits = self.forward(&tokens, &step, cache, Logits::Last)?;
            for (b, p) in pieces.iter().enumerate() {
                if !p.is_empty() && start + p.len() == rows[b].len() {
                    last[b] = Some(logits.get(b)?);
                }
            }
            start += chunk;
        }
        cache.end_prefill()?;
        let rows: Vec<Tensor> = last
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::InvalidInput("empty row".into())))
            .collect::<Result<_>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}
