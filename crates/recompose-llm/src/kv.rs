//! The KV-cache seam. Attention hands a policy the keys and values of each step (per layer, RoPE
//! applied) and attends over what the policy returns; score-based policies also see how much
//! attention each slot received. Policies own their memory and report it. This file holds the
//! trait, the model facts a policy is built from, and the full (unbounded) cache; bounded
//! policies live in recompose-kv.

use crate::error::{Error, Result};
use crate::rope::Rope;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// What a cache policy needs to know about the model it serves.
#[derive(Clone)]
pub struct CacheLayout {
    pub num_layers: usize,
    pub num_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence the model accepts.
    pub max_len: usize,
    /// Per layer: the sliding-window length, if the layer has one.
    pub windows: Vec<Option<usize>>,
    /// Per layer: the rotary embedding its keys were rotated with (for re-positioning keys).
    pub ropes: Vec<Arc<Rope>>,
    /// Where keys and values live.
    pub device: Device,
}

/// One forward step over a batch: each row's new tokens start at `start[b]` (its position) and
/// `lens[b] <= t` of its `t` columns are real (the rest is right padding).
#[derive(Debug, Clone)]
pub struct Step {
    pub start: Vec<usize>,
    pub lens: Vec<usize>,
    pub t: usize,
}

impl Step {
    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Checks the step against a cache of `seen.len()` rows holding `seen[b]` tokens each.
    pub fn check(&self, seen: &[usize]) -> Result<()> {
        if self.batch() != seen.len() || self.start.len() != seen.len() {
            return Err(Error::InvalidInput(format!("step has {} rows, cache has {}", self.batch(), seen.len())));
        }
        if let Some(b) = (0..seen.len()).find(|&b| self.lens[b] > self.t) {
            return Err(Error::InvalidInput(format!(
                "row {b} has {} tokens in a {}-column step",
                self.lens[b], self.t
            )));
        }
        match (0..seen.len()).find(|&b| self.start[b] != seen[b]) {
            Some(b) => Err(Error::InvalidInput(format!(
                "row {b} starts at {} but has {} tokens cached",
                self.start[b], seen[b]
            ))),
            None => Ok(()),
        }
    }
}

/// What a layer attends over: keys/values `(B, Hkv, L, D)` and an additive mask `(B, 1, T, L)`
/// shared by the KV heads or `(B, Hkv, T, L)` per head (None when every slot is visible to every
/// query).
pub struct KvView {
    pub k: Tensor,
    pub v: Tensor,
    pub mask: Option<Tensor>,
    /// Set when the view holds exactly the step's own keys and the mask is plain causal masking
    /// (within this window, if any): attention may then skip the masked half instead of adding
    /// the mask.
    pub causal: Option<Causal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Causal {
    pub window: Option<usize>,
}

pub trait KvCache: Send {
    /// Called once per step before the first layer.
    fn begin_step(&mut self, step: &Step) -> Result<()>;
    /// Stores this step's keys/values `(B, Hkv, T, D)` for `layer`; `window` limits how far back
    /// a query may look (sliding-window layers).
    fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<KvView>;
    /// Whether the policy wants `observe` calls.
    fn wants_probs(&self) -> bool {
        false
    }
    /// The attention mass `(B, Hq, L)` each slot of `layer`'s last view received: softmax
    /// probabilities summed over the step's real query columns (padding columns excluded).
    fn observe(&mut self, _layer: usize, _mass: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Longest step the policy wants while a prompt is prefilled (None: the caller's choice).
    fn prefill_chunk(&self) -> Option<usize> {
        None
    }
    /// The whole prompt is in; a policy that defers eviction during prefill cuts now.
    fn end_prefill(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called once per step after the last layer.
    fn end_step(&mut self) -> Result<()>;
    /// Copies of the keys and values of row 0's first `n` tokens, per layer `(1, Hkv, n, D)`,
    /// when the policy still holds every one of them in order: a prefix other requests may
    /// share (see `prefix::PrefixCache`). None for policies that evict or reorder.
    fn export_prefix(&self, _n: usize) -> Option<Result<Vec<(Tensor, Tensor)>>> {
        None
    }
    /// Loads a prefix exported from a cache of the same model into this empty cache, as if its
    /// tokens had been fed; Ok(false) when the policy cannot take one (it then stays empty).
    fn import_prefix(&mut self, _kv: &[(Tensor, Tensor)]) -> Result<bool> {
        Ok(false)
    }
    /// Tokens seen so far by batch row `b` (the next token's position).
    fn seq_len(&self, b: usize) -> usize;
    fn batch_size(&self) -> usize;
    /// Bytes of key/value storage held now.
    fn resident_bytes(&self) -> usize;
    fn describe(&self) -> String;
}

/// Large negative used instead of -inf so fully masked (padding) rows stay finite.
pub const MASKED: f32 = -1e30;

/// The plain cache: every token kept. Storage is preallocated per layer as `(B, Hkv, cap, D)`
/// and doubles when full; all rows share one slot cursor, padding slots are masked.
pub struct FullCache {
    num_layers: usize,
    batch: usize,
    max_len: usize,
    cap: usize,
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Position held by each slot of each row (-1: padding).
    slot_pos: Vec<Vec<i64>>,
    lens: Vec<usize>,
    cursor: usize,
    step: Option<Step>,
    mask_global: Option<Tensor>,
    mask_window: Option<(usize, Option<Tensor>)>,
    device: Device,
}

impl FullCache {
    pub fn new(num_layers: usize, batch: usize, max_len: usize) -> Self {
        Self {
            num_layers,
            batch,
            max_len,
            cap: 0,
            layers: (0..num_layers).map(|_| None).collect(),
            slot_pos: vec![vec![]; batch],
            lens: vec![0; batch],
            cursor: 0,
            step: None,
            mask_global: None,
            mask_window: None,
            device: Device::Cpu,
        }
    }

    /// Keeps keys and values (and builds masks) on `device`.
    pub fn on(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    fn grow(&mut self, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let new_cap = need.max(self.cap * 2).max(64).min(self.max_len.max(need));
        for l in self.layers.iter_mut() {
            if let Some((k, v)) = l.take() {
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let (b, h, _, d) = t.dims4()?;
                    let z = Tensor::zeros((b, h, new_cap, d), t.dtype(), t.device())?;
                    z.slice_set(&t.narrow(2, 0, self.cursor)?.contiguous()?, 2, 0)?;
                    Ok(z)
                };
                *l = Some((grow(&k)?, grow(&v)?));
            }
        }
        self.cap = new_cap;
        Ok(())
    }

    /// Builds the additive mask for the current step, or None when nothing needs masking.
    fn build_mask(&self, step: &Step, window: Option<usize>) -> Result<Option<Tensor>> {
        let l = self.cursor + step.t;
        let mut needed = false;
        let mut m = vec![0f32; step.batch() * step.t * l];
        for b in 0..step.batch() {
            for t in 0..step.t {
                let qpos = (step.start[b] + t) as i64;
                let row = &mut m[(b * step.t + t) * l..(b * step.t + t + 1) * l];
                for (s, cell) in row.iter_mut().enumerate() {
                    let p = self.slot_pos[b][s];
                    let visible = p >= 0 && p <= qpos && window.is_none_or(|w| qpos - p < w as i64);
                    if !visible {
                        *cell = MASKED;
                        needed = true;
                    }
                }
            }
        }
        if !needed {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(m, (step.batch(), 1, step.t, l), &self.device)?))
    }
}

impl KvCache for FullCache {
    fn begin_step(&mut self, step: &Step) -> Result<()> {
        step.check(&self.lens)?;
        if self.cursor + step.t > self.max_len {
            return Err(Error::ContextOverflow { tokens: self.cursor + step.t, context: self.max_len });
        }
        self.grow(self.cursor + step.t)?;
        for b in 0..self.batch {
            for t in 0..step.t {
                let p = if t < step.lens[b] { (step.start[b] + t) as i64 } else { -1 };
                self.slot_pos[b].push(p);
            }
        }
        self.mask_global = self.build_mask(step, None)?;
        self.mask_window = None;
        self.step = Some(step.clone());
        Ok(())
    }

    fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<KvView> {
        let Some(step) = self.step.clone() else {
            return Err(Error::InvalidInput("update outside a step".into()));
        };
        let cap = self.cap;
        let entry =
            self.layers.get_mut(layer).ok_or_else(|| Error::InvalidInput(format!("layer {layer} out of range")))?;
        // Sized from the layer's own keys: pruned models may have fewer KV heads in some layers.
        let (ck, cv) = match entry {
            Some(kv) => &*kv,
            None => {
                let (b, h, _, d) = k.dims4()?;
                let z = || Tensor::zeros((b, h, cap, d), k.dtype(), k.device());
                &*entry.insert((z()?, z()?))
            }
        };
        ck.slice_set(&k.contiguous()?, 2, self.cursor)?;
        cv.slice_set(&v.contiguous()?, 2, self.cursor)?;
        let l = self.cursor + step.t;
        let (k, v) = (ck.narrow(2, 0, l)?, cv.narrow(2, 0, l)?);
        let mask = match window {
            None => self.mask_global.clone(),
            Some(w) => {
                if self.mask_window.as_ref().is_none_or(|(ww, _)| *ww != w) {
                    self.mask_window = Some((w, self.build_mask(&step, Some(w))?));
                }
                self.mask_window.as_ref().and_then(|(_, m)| m.clone())
            }
        };
        Ok(KvView { k, v, mask, causal: None })
    }

    fn end_step(&mut self) -> Result<()> {
        let Some(step) = self.step.take() else { return Ok(()) };
        self.cursor += step.t;
        for b in 0..self.batch {
            self.lens[b] += step.lens[b];
        }
        Ok(())
    }

    fn export_prefix(&self, n: usize) -> Option<Result<Vec<(Tensor, Tensor)>>> {
        // Row 0's first n slots must hold positions 0..n (no padding in front).
        let in_order = self
            .slot_pos
            .first()
            .is_some_and(|p| p.len() >= n && p[..n].iter().enumerate().all(|(i, &q)| q == i as i64));
        if self.batch != 1 || n == 0 || n > self.lens[0] || !in_order || self.layers.iter().any(Option::is_none) {
            return None;
        }
        // A compact copy: `copy()` would clone the whole storage, spare capacity included, and
        // the prefix cache would hold more than it counts.
        let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, 0, n)?.force_contiguous()?) };
        Some(self.layers.iter().flatten().map(|(k, v)| Ok((copy(k)?, copy(v)?))).collect())
    }

    fn import_prefix(&mut self, kv: &[(Tensor, Tensor)]) -> Result<bool> {
        if self.batch != 1 || self.cursor != 0 || kv.len() != self.num_layers {
            return Ok(false);
        }
        let n = kv[0].0.dim(2)?;
        if n == 0 || n > self.max_len || kv.iter().any(|(k, v)| k.dim(2).ok() != Some(n) || v.dims() != k.dims()) {
            return Err(Error::InvalidInput("a shared prefix's layers disagree in length".into()));
        }
        self.grow(n)?;
        let cap = self.cap;
        for (slot, (k, v)) in self.layers.iter_mut().zip(kv) {
            let (b, h, _, d) = k.dims4()?;
            let z = || Tensor::zeros((b, h, cap, d), k.dtype(), &self.device);
            let (ck, cv) = (z()?, z()?);
            ck.slice_set(&k.to_device(&self.device)?.contiguous()?, 2, 0)?;
            cv.slice_set(&v.to_device(&self.device)?.contiguous()?, 2, 0)?;
            *slot = Some((ck, cv));
        }
        self.slot_pos[0] = (0..n as i64).collect();
        self.lens[0] = n;
        self.cursor = n;
        Ok(true)
    }

    fn seq_len(&self, b: usize) -> usize {
        self.lens[b]
    }
    fn batch_size(&self) -> usize {
        self.batch
    }
    fn resident_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }
    fn describe(&self) -> String {
        format!("full ({} layers, {} slots used)", self.num_layers, self.cursor)
    }
}

/// Attention within the step only: each query sees the step's own keys up to its position (and
/// inside its layer's window). Nothing is kept between steps, and keys and values stay in the
/// autograd graph (no copy into storage), so gradients flow through attention: training, and the
/// scoring of whole sequences whose tokens all arrive at once.
pub struct StepCache {
    batch: usize,
    step: Option<Step>,
    masks: Vec<(Option<usize>, Option<Tensor>)>,
    dtype: DType,
    device: Device,
}

impl StepCache {
    pub fn new(batch: usize, dtype: DType, device: &Device) -> Self {
        Self { batch, step: None, masks: vec![], dtype, device: device.clone() }
    }

    fn mask(&self, step: &Step, window: Option<usize>) -> Result<Option<Tensor>> {
        let t = step.t;
        if t <= 1 {
            return Ok(None);
        }
        let mut m = vec![0f32; step.batch() * t * t];
        for b in 0..step.batch() {
            for i in 0..t {
                for j in 0..t {
                    let visible = j <= i && window.is_none_or(|w| i - j < w) && (j < step.lens[b] || j == 0);
                    if !visible {
                        m[(b * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (step.batch(), 1, t, t), &self.device)?.to_dtype(self.dtype)?))
    }
}

impl KvCache for StepCache {
    fn begin_step(&mut self, step: &Step) -> Result<()> {
        if step.batch() != self.batch || step.start.len() != self.batch {
            return Err(Error::InvalidInput(format!("step has {} rows, cache has {}", step.batch(), self.batch)));
        }
        if let Some(b) = (0..self.batch).find(|&b| step.lens[b] > step.t) {
            return Err(Error::InvalidInput(format!(
                "row {b} has {} tokens in a {}-column step",
                step.lens[b], step.t
            )));
        }
        self.step = Some(step.clone());
        self.masks.clear();
        Ok(())
    }

    fn update(&mut self, _layer: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<KvView> {
        let Some(step) = self.step.clone() else {
            return Err(Error::InvalidInput("update outside a step".into()));
        };
        let mask = match self.masks.iter().find(|(w, _)| *w == window) {
            Some((_, m)) => m.clone(),
            None => {
                let m = self.mask(&step, window)?;
                self.masks.push((window, m.clone()));
                m
            }
        };
        Ok(KvView { k: k.clone(), v: v.clone(), mask, causal: Some(Causal { window }) })
    }

    fn end_step(&mut self) -> Result<()> {
        self.step = None;
        Ok(())
    }

    fn seq_len(&self, _b: usize) -> usize {
        0
    }
    fn batch_size(&self) -> usize {
        self.batch
    }
    fn resident_bytes(&self) -> usize {
        0
    }
    fn describe(&self) -> String {
        "step (attention within the step, nothing kept)".into()
    }
}
