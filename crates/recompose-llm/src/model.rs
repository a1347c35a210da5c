//! The decoder: Llama-family blocks (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings) and Gemma 3's
//! variant (QK-norm, sandwich norms, sliding-window layers with their own RoPE base, scaled
//! embeddings, GELU). Weights are read by HF name from a `ModelFile`; attention talks to a
//! `KvCache`, the MLP is an `Ffn`. Owns no sampling and no cache policy.

use crate::error::{Error, Result};
use crate::ffn::{DenseFfn, Ffn};
use crate::kernels::quant::PackedWeight;
use crate::kv::{CacheLayout, FullCache, KvCache, KvView, Step};
use crate::linear::Linear;
use crate::rope::Rope;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use recompose_core::config::{Arch, ModelConfig};
use recompose_core::weights::ModelFile;
use std::sync::Arc;

/// Query columns up to which attention runs fused (decode, small chunks); longer prefills use
/// batched matmuls, which win when there are many queries per key.
const FUSED_ATTENTION_MAX_T: usize = 16;

/// Which weight form the model computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// Quantised blocks as stored (fast path); f32 for unquantised files.
    #[default]
    Quantized,
    /// Everything dequantised to f32 (the exact reference path).
    F32,
}

enum Embedding {
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

pub struct Block {
    attn_norm: Tensor,
    attn: Attention,
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

pub struct Model {
    pub config: ModelConfig,
    embed: Embedding,
    pub layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope_global: Arc<Rope>,
    rope_local: Arc<Rope>,
    pub mode: WeightMode,
}

fn load_linear(file: &ModelFile, name: &str, shape: [usize; 2], mode: WeightMode) -> Result<Linear> {
    if mode == WeightMode::Quantized {
        if let Some(m) = file.quantized(name)? {
            let dtype = m.info.dtype;
            if m.info.shape != shape {
                return Err(recompose_core::Error::BadTensor {
                    path: file.path.clone(),
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
                return Ok(Linear::Packed(Arc::new(p)));
            }
            // Other types (Q6_K, Q2_K, ...) run dequantised: candle's K-quant matmul is several
            // times slower than f32 on these CPUs (measured: gemma3 decode 12 vs 63 tok/s).
        }
    }
    Ok(Linear::Dense(file.f32(name, &shape)?))
}

impl Model {
    pub fn load(file: &ModelFile, mode: WeightMode) -> Result<Self> {
        let c = file.config.clone();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let emb_name = "model.embed_tokens.weight";
        let packed_embed = match (mode, file.quantized(emb_name)?) {
            (WeightMode::Quantized, Some(m)) => {
                PackedWeight::from_ggml(m.info.dtype, m.bytes(), c.vocab_size, h).map(Arc::new)
            }
            _ => None,
        };
        let (embed, tied_head) = match packed_embed {
            Some(p) => (Embedding::Packed(p.clone()), Linear::Packed(p)),
            None => {
                let t = file.f32(emb_name, &[c.vocab_size, h])?;
                let head = if mode == WeightMode::Quantized && file.quantized(emb_name)?.is_some() {
                    load_linear(file, emb_name, [c.vocab_size, h], mode)?
                } else {
                    Linear::Dense(t.clone())
                };
                (Embedding::Dense(t), head)
            }
        };
        let lm_head = if file.has("lm_head.weight") {
            load_linear(file, "lm_head.weight", [c.vocab_size, h], mode)?
        } else {
            tied_head
        };
        let gemma = c.arch == Arch::Gemma3;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let norm = |s: &str, n: usize| file.f32(&p(s), &[n]);
            let attn = Attention {
                q: load_linear(file, &p("self_attn.q_proj.weight"), [qd, h], mode)?,
                k: load_linear(file, &p("self_attn.k_proj.weight"), [kvd, h], mode)?,
                v: load_linear(file, &p("self_attn.v_proj.weight"), [kvd, h], mode)?,
                o: load_linear(file, &p("self_attn.o_proj.weight"), [h, qd], mode)?,
                q_norm: if gemma { Some(norm("self_attn.q_norm.weight", c.head_dim)?) } else { None },
                k_norm: if gemma { Some(norm("self_attn.k_norm.weight", c.head_dim)?) } else { None },
            };
            let ffn = DenseFfn {
                gate: load_linear(file, &p("mlp.gate_proj.weight"), [i, h], mode)?,
                up: load_linear(file, &p("mlp.up_proj.weight"), [i, h], mode)?,
                down: load_linear(file, &p("mlp.down_proj.weight"), [h, i], mode)?,
                activation: c.activation,
            };
            let (ffn_norm_name, post_attn, post_ffn) = if gemma {
                (
                    "pre_feedforward_layernorm.weight",
                    Some(norm("post_attention_layernorm.weight", h)?),
                    Some(norm("post_feedforward_layernorm.weight", h)?),
                )
            } else {
                ("post_attention_layernorm.weight", None, None)
            };
            layers.push(Block {
                attn_norm: norm("input_layernorm.weight", h)?,
                attn,
                post_attn_norm: post_attn,
                ffn_norm: norm(ffn_norm_name, h)?,
                post_ffn_norm: post_ffn,
                ffn: Box::new(ffn),
            });
        }
        let norm = file.f32("model.norm.weight", &[h])?;
        let rope_global = Arc::new(Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling, c.rope_style));
        let rope_local = Arc::new(Rope::new(
            c.head_dim,
            c.rope_theta_local,
            &recompose_core::config::RopeScaling::None,
            c.rope_style,
        ));
        Ok(Self { config: c, embed, layers, norm, lm_head, rope_global, rope_local, mode })
    }

    /// A full cache sized for this model.
    pub fn new_cache(&self, batch: usize) -> FullCache {
        let c = &self.config;
        FullCache::new(c.num_layers, batch, c.num_kv_heads, c.head_dim, c.max_position)
    }

    /// The facts a cache policy is built from.
    pub fn cache_layout(&self) -> CacheLayout {
        let c = &self.config;
        CacheLayout {
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_len: c.max_position,
            windows: (0..c.num_layers).map(|l| if c.is_sliding(l) { c.sliding_window } else { None }).collect(),
            ropes: (0..c.num_layers)
                .map(|l| if c.is_sliding(l) { self.rope_local.clone() } else { self.rope_global.clone() })
                .collect(),
        }
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let h = self.config.hidden_size;
        let v = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {v}")));
        }
        let x = match &self.embed {
            Embedding::Dense(t) => {
                let ids = Tensor::from_vec(tokens.to_vec(), tokens.len(), &Device::Cpu)?;
                t.index_select(&ids, 0)?
            }
            Embedding::Packed(p) => {
                let mut out = vec![0f32; tokens.len() * h];
                for (i, &t) in tokens.iter().enumerate() {
                    p.dequantize_row(t as usize, &mut out[i * h..(i + 1) * h]);
                }
                Tensor::from_vec(out, (tokens.len(), h), &Device::Cpu)?
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
        self.forward_caches(tokens, step, &mut [cache], logits)
    }

    /// One step over rows that each own a cache of batch 1 — the requests of a server, which
    /// join and leave at token boundaries, each with its own KV policy. Projections and FFNs run
    /// batched over the rows; attention runs row by row against each row's cache.
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        step: &Step,
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
    ) -> Result<Tensor> {
        if caches.len() != step.batch() || caches.iter().any(|c| c.batch_size() != 1) {
            return Err(Error::InvalidInput(format!(
                "{} caches for a {}-row step (one cache of batch 1 per row)",
                caches.len(),
                step.batch()
            )));
        }
        self.forward_caches(tokens, step, caches, logits)
    }

    /// `caches`: one cache for every row, or one per row.
    fn forward_caches(
        &self,
        tokens: &[u32],
        step: &Step,
        caches: &mut [&mut dyn KvCache],
        logits: Logits,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (step.batch(), step.t);
        if tokens.len() != b * t || step.start.len() != b {
            return Err(Error::InvalidInput(format!("{} tokens for a {b} x {t} step", tokens.len())));
        }
        let end = step.start.iter().zip(&step.lens).map(|(s, l)| s + l).max().unwrap_or(0);
        if end > c.max_position {
            return Err(Error::ContextOverflow { tokens: end, context: c.max_position });
        }
        let eps = c.rms_eps as f32;
        let mut x = self.embed(tokens)?.reshape((b, t, c.hidden_size))?;
        for_each_cache(caches, step, |cache, s| cache.begin_step(s))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut a = self.attention(li, &layer.attn, &h, step, caches)?;
            if let Some(n) = &layer.post_attn_norm {
                a = candle_nn::ops::rms_norm(&a, n, eps)?;
            }
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let mut f = layer.ffn.forward(&h.reshape((b * t, c.hidden_size))?)?.reshape((b, t, c.hidden_size))?;
            if let Some(n) = &layer.post_ffn_norm {
                f = candle_nn::ops::rms_norm(&f, n, eps)?;
            }
            x = (x + f)?;
        }
        for_each_cache(caches, step, |cache, _| cache.end_step())?;
        let x = match logits {
            Logits::All => x,
            Logits::From(c) if c < t => x.narrow(1, c, t - c)?,
            Logits::From(c) => return Err(Error::InvalidInput(format!("logits from column {c} of a {t}-column step"))),
            Logits::Last => {
                let idx: Vec<u32> = (0..b).map(|r| (r * t + step.lens[r].max(1) - 1) as u32).collect();
                let idx = Tensor::from_vec(idx, b, &Device::Cpu)?;
                x.reshape((b * t, c.hidden_size))?.index_select(&idx, 0)?
            }
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let mut out = self.lm_head.forward(&x)?;
        if let Some(cap) = c.final_logit_softcap {
            out = ((out / cap)?.tanh()? * cap)?;
        }
        Ok(out)
    }

    fn attention(
        &self,
        li: usize,
        at: &Attention,
        x: &Tensor,
        step: &Step,
        caches: &mut [&mut dyn KvCache],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let g = hq / hkv;
        let q = at.q.forward(x)?.reshape((b, t, hq, d))?.transpose(1, 2)?.contiguous()?;
        let k = at.k.forward(x)?.reshape((b, t, hkv, d))?.transpose(1, 2)?.contiguous()?;
        let v = at.v.forward(x)?.reshape((b, t, hkv, d))?.transpose(1, 2)?.contiguous()?;
        let eps = c.rms_eps as f32;
        let q = match &at.q_norm {
            Some(n) => candle_nn::ops::rms_norm(&q, n, eps)?,
            None => q,
        };
        let k = match &at.k_norm {
            Some(n) => candle_nn::ops::rms_norm(&k, n, eps)?,
            None => k,
        };
        let sliding = c.is_sliding(li);
        let rope = if sliding { &self.rope_local } else { &self.rope_global };
        let q = rope.apply(&q, &step.start)?;
        let k = rope.apply(&k, &step.start)?;
        let window = if sliding { c.sliding_window } else { None };
        // Query heads of a GQA group share their KV head: fold the group into the query axis.
        let q = q.reshape((b, hkv, g * t, d))?;
        let out = if caches.len() == 1 {
            let view = caches[0].update(li, &k, &v, window)?;
            self.attend(li, &q, &view, step, &mut *caches[0])?
        } else {
            let mut outs = Vec::with_capacity(b);
            for (r, cache) in caches.iter_mut().enumerate() {
                let (kr, vr) = (k.narrow(0, r, 1)?, v.narrow(0, r, 1)?);
                let view = cache.update(li, &kr, &vr, window)?;
                outs.push(self.attend(li, &q.narrow(0, r, 1)?, &view, &row_step(step, r), &mut **cache)?);
            }
            Tensor::cat(&outs, 0)?
        };
        let out = out.reshape((b, hq, t, d))?.transpose(1, 2)?.reshape((b, t, hq * d))?;
        at.o.forward(&out)
    }

    /// Attention of queries `(B, Hkv, G*T, D)` over a cache view; `(B, Hkv, G*T, D)` out.
    fn attend(&self, li: usize, q: &Tensor, view: &KvView, step: &Step, cache: &mut dyn KvCache) -> Result<Tensor> {
        let c = &self.config;
        let (b, hkv, _, _) = q.dims4()?;
        let (hq, t) = (c.num_heads, step.t);
        let g = hq / hkv;
        let l = view.k.dim(2)?;
        let wants_mass = cache.wants_probs();
        let out = if t <= FUSED_ATTENTION_MAX_T {
            let lens = wants_mass.then_some(step.lens.as_slice());
            let (out, mass) = crate::attention::fused_attention(
                &q,
                &view.k,
                &view.v,
                view.mask.as_ref(),
                c.attn_scale as f32,
                t,
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
                    scores.reshape((b, hkv, g, t, l))?.broadcast_add(&m.unsqueeze(2)?)?.reshape((b, hkv, g * t, l))?
                }
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            if wants_mass {
                // Sum over each row's real query columns only, as a matmul with a 0/1 row
                // (a strided sum over the query axis is several times slower).
                let valid: Vec<f32> = (0..b * t).map(|i| if i % t < step.lens[i / t] { 1.0 } else { 0.0 }).collect();
                let valid = Tensor::from_vec(valid, (b, 1, 1, t), &Device::Cpu)?.broadcast_as((b, hq, 1, t))?;
                let mass = valid.contiguous()?.matmul(&probs.reshape((b, hq, t, l))?)?.squeeze(2)?;
                cache.observe(li, &mass)?;
            }
            probs.matmul(&view.v.contiguous()?)? // (b, hkv, g*t, d)
        };

        Ok(out)
    }
}

/// Row `r` of a step, for that row's own cache.
fn row_step(step: &Step, r: usize) -> Step {
    Step { start: vec![step.start[r]], lens: vec![step.lens[r]], t: step.t }
}

/// Calls `f` on the one shared cache with the whole step, or on each row's cache with its row.
fn for_each_cache(
    caches: &mut [&mut dyn KvCache],
    step: &Step,
    mut f: impl FnMut(&mut dyn KvCache, &Step) -> Result<()>,
) -> Result<()> {
    if caches.len() == 1 {
        return f(&mut *caches[0], step);
    }
    for (r, cache) in caches.iter_mut().enumerate() {
        f(&mut **cache, &row_step(step, r))?;
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
