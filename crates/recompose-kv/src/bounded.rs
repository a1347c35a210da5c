//! The bounded cache: a fixed set of slots per (layer, row, KV head) that every bounded policy
//! shares. A step's new keys/values are written after the resident slots; attention runs over
//! both; then each (layer, row, head) keeps its budget by the policy's rule and the surviving
//! new entries move into the freed slots (a few row copies, in place). Nothing is re-gathered
//! and, once the prompt is in, nothing grows.

use crate::spec::{Aggregate, Prefill, RowBudget};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};
use recompose_llm::kv::{CacheLayout, KvCache, KvView, Step, MASKED};
use recompose_llm::{Error, Result};

/// Slots kept free for decode steps beyond the budget once a full prefill is cut.
const DECODE_SPARE: usize = 16;

/// What decides which entries stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Rule {
    /// The first `sinks` tokens and the most recent ones; `reposition` moves the sinks' keys to
    /// just before the recent window (positions by index in the cache, as StreamingLLM).
    Window { sinks: usize, reposition: bool },
    /// The most recent tokens and the highest accumulated attention among the rest.
    H2o { agg: Aggregate },
}

struct LayerSlots {
    k: Tensor,
    v: Tensor,
    /// Position held by each slot, `(B, Hkv, cap)` flattened; -1 for a free slot.
    pos: Vec<i64>,
    /// Accumulated attention of each slot (h2o).
    score: Vec<f32>,
    /// Original keys of the sinks `(B, Hkv, sinks, D)` (window with reposition).
    sink_keys: Vec<f32>,
}

pub struct BoundedCache {
    layout: CacheLayout,
    batch: usize,
    rule: Rule,
    budgets: Vec<RowBudget>,
    max_keep: usize,
    prefill: Prefill,
    /// Eviction waits for `end_prefill` (full-attention prefill).
    deferring: bool,
    cap: usize,
    /// Slots in use by any row: new entries of a step are written from here.
    fill: usize,
    layers: Vec<Option<LayerSlots>>,
    lens: Vec<usize>,
    step: Option<Step>,
    /// The window rule's mask is the same for every layer and head: built once per step.
    shared_mask: Vec<(Option<usize>, Option<Tensor>)>,
}

impl BoundedCache {
    fn new(layout: &CacheLayout, rule: Rule, budgets: Vec<RowBudget>, prefill: Prefill) -> Self {
        let max_keep = budgets.iter().map(|b| b.keep).max().unwrap_or(1);
        let rows = budgets.len();
        Self {
            layout: layout.clone(),
            batch: budgets.len(),
            rule,
            budgets,
            max_keep,
            prefill,
            deferring: prefill == Prefill::Full,
            cap: 0,
            fill: 0,
            layers: (0..layout.num_layers).map(|_| None).collect(),
            lens: vec![0; rows],
            step: None,
            shared_mask: vec![],
        }
    }

    /// The bounded cache a spec describes (None for `full`).
    pub fn from_spec(layout: &CacheLayout, spec: &crate::KvSpec, prompt_lens: &[usize]) -> Option<Self> {
        Some(Self::new(layout, spec.rule()?, spec.row_budgets(prompt_lens)?, spec.prefill()))
    }

    /// Positions `layer` holds for (row, KV head), ascending (tests and diagnostics).
    pub fn held(&self, layer: usize, row: usize, head: usize) -> Vec<i64> {
        let Some(Some(slots)) = self.layers.get(layer) else { return vec![] };
        if row >= self.batch || head >= self.layout.kv_heads {
            return vec![];
        }
        let base = (row * self.layout.kv_heads + head) * self.cap;
        let mut p: Vec<i64> = slots.pos[base..base + self.fill].iter().copied().filter(|&p| p >= 0).collect();
        p.sort_unstable();
        p
    }

    fn rows(&self) -> usize {
        self.batch * self.layout.kv_heads
    }

    /// Grows every layer's slots to hold `need` (only while a full prefill is deferring, or at
    /// the first step).
    fn reserve(&mut self, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        // Doubling while a full prefill defers eviction, but never past what the model can hold.
        let new_cap = if self.deferring { need.max((self.cap * 2).min(self.layout.max_len)) } else { need };
        self.resize(new_cap)
    }

    /// Moves every layer to `new_cap` slots per row (slots past `fill` are free).
    fn resize(&mut self, new_cap: usize) -> Result<()> {
        let (rows, d, keep) = (self.rows(), self.layout.head_dim, self.fill.min(new_cap));
        let (b, h) = (self.batch, self.layout.kv_heads);
        for slots in self.layers.iter_mut().flatten() {
            let move_to = |t: &Tensor| -> Result<Tensor> {
                let z = Tensor::zeros((b, h, new_cap, d), DType::F32, &self.layout.device)?;
                if keep > 0 {
                    z.slice_set(&t.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
                }
                Ok(z)
            };
            slots.k = move_to(&slots.k)?;
            slots.v = move_to(&slots.v)?;
            let mut pos = vec![-1i64; rows * new_cap];
            let mut score = vec![0f32; rows * new_cap];
            for r in 0..rows {
                pos[r * new_cap..r * new_cap + keep].copy_from_slice(&slots.pos[r * self.cap..r * self.cap + keep]);
                score[r * new_cap..r * new_cap + keep].copy_from_slice(&slots.score[r * self.cap..r * self.cap + keep]);
            }
            slots.pos = pos;
            slots.score = score;
        }
        self.cap = new_cap;
        Ok(())
    }

    fn new_layer(&self) -> Result<LayerSlots> {
        let (b, h, d) = (self.batch, self.layout.kv_heads, self.layout.head_dim);
        let sinks = match self.rule {
            Rule::Window { sinks, reposition: true } => sinks,
            _ => 0,
        };
        Ok(LayerSlots {
            k: Tensor::zeros((b, h, self.cap, d), DType::F32, &self.layout.device)?,
            v: Tensor::zeros((b, h, self.cap, d), DType::F32, &self.layout.device)?,
            pos: vec![-1; self.rows() * self.cap],
            score: vec![0.0; self.rows() * self.cap],
            sink_keys: vec![0.0; b * h * sinks * d],
        })
    }

    /// The additive mask `(B, heads, T, fill + T)` for the current step, or None.
    fn mask(&self, pos: &[i64], step: &Step, window: Option<usize>, heads: usize) -> Result<Option<Tensor>> {
        let (t, l, cap) = (step.t, self.fill + step.t, self.cap);
        // Decode with every slot filled and nothing out of a window needs no mask: check first.
        let visible = |p: i64, q: i64| p >= 0 && p <= q && window.is_none_or(|w| q - p < w as i64);
        let all_visible = (0..self.batch).all(|b| {
            (0..heads).all(|h| {
                let slots = &pos[(b * self.layout.kv_heads + h) * cap..][..l];
                (0..t).all(|q| {
                    let qpos = (step.start[b] + q) as i64;
                    slots.iter().all(|&p| visible(p, qpos))
                })
            })
        });
        if all_visible {
            return Ok(None);
        }
        let mut needed = false;
        let mut m = vec![0f32; self.batch * heads * t * l];
        for b in 0..self.batch {
            for h in 0..heads {
                let slots = &pos[(b * self.layout.kv_heads + h) * cap..][..l];
                for q in 0..t {
                    let qpos = (step.start[b] + q) as i64;
                    let row = &mut m[((b * heads + h) * t + q) * l..][..l];
                    for (cell, &p) in row.iter_mut().zip(slots) {
                        if p < 0 || p > qpos || window.is_some_and(|w| qpos - p >= w as i64) {
                            *cell = MASKED;
                            needed = true;
                        }
                    }
                }
            }
        }
        Ok(if needed { Some(Tensor::from_vec(m, (self.batch, heads, t, l), &self.layout.device)?) } else { None })
    }

    /// Keeps each (layer, row, head)'s budget and compacts survivors into `[0, max_keep)`.
    fn evict(&mut self) -> Result<()> {
        let (cap, fill, heads, d) = (self.cap, self.fill, self.layout.kv_heads, self.layout.head_dim);
        for (li, slots) in self.layers.iter_mut().enumerate() {
            let Some(slots) = slots else { continue };
            let window = self.layout.windows[li];
            let mut moves = vec![];
            for b in 0..self.batch {
                let (n, budget) = (self.lens[b] as i64, self.budgets[b]);
                for h in 0..heads {
                    let base = (b * heads + h) * cap;
                    // Slots past `fill` are free; the compaction below may use them up to max_keep.
                    let pos = &mut slots.pos[base..base + fill.max(self.max_keep)];
                    let used = pos.iter().filter(|&&p| p >= 0).count();
                    if used > budget.keep {
                        let recent_from = n - budget.recent as i64;
                        let mut victims: Vec<usize> = match self.rule {
                            Rule::Window { sinks, .. } => {
                                (0..fill).filter(|&s| pos[s] >= sinks as i64 && pos[s] < recent_from).collect()
                            }
                            Rule::H2o { .. } => {
                                let score = &slots.score[base..base + fill];
                                // Entries a sliding-window layer can no longer see go first.
                                let stale = |s: usize| window.is_some_and(|w| n - pos[s] >= w as i64);
                                let mut c: Vec<usize> =
                                    (0..fill).filter(|&s| pos[s] >= 0 && pos[s] < recent_from).collect();
                                // Only the k worst are needed: a selection, not a sort (k is 1 in
                                // decode). Positions are unique, so the order is total.
                                let k = used - budget.keep;
                                if k < c.len() {
                                    c.select_nth_unstable_by(k, |&a, &b| {
                                        stale(b)
                                            .cmp(&stale(a))
                                            .then(score[a].total_cmp(&score[b]))
                                            .then(pos[a].cmp(&pos[b]))
                                    });
                                }
                                c
                            }
                        };
                        victims.truncate(used - budget.keep);
                        for s in victims {
                            pos[s] = -1;
                        }
                    }
                    // Survivors past max_keep move into the lowest free slots, oldest first.
                    let mut free = (0..self.max_keep).filter(|&s| pos[s] < 0);
                    let mut movers: Vec<usize> = (self.max_keep..fill).filter(|&s| pos[s] >= 0).collect();
                    movers.sort_by_key(|&s| pos[s]);
                    for s in movers {
                        let Some(dst) = free.next() else {
                            return Err(Error::InvalidInput("bounded cache: no free slot (budget bookkeeping)".into()));
                        };
                        moves.push((base + s, base + dst));
                    }
                }
            }
            for &(src, dst) in &moves {
                slots.pos[dst] = slots.pos[src];
                slots.score[dst] = slots.score[src];
            }
            for r in 0..self.batch * heads {
                for s in self.max_keep..fill {
                    slots.pos[r * cap + s] = -1;
                    slots.score[r * cap + s] = 0.0;
                }
            }
            if !moves.is_empty() {
                let op = CopyRows { src: None, rows: &moves, d };
                slots.k.inplace_op1(&op)?;
                slots.v.inplace_op1(&op)?;
            }
        }
        self.fill = self.max_keep.min(fill);
        Ok(())
    }

    /// Rewrites the sinks' keys at the positions they have counted by index in the cache: just
    /// before the oldest recent token. Queries keep their own positions, so every offset the
    /// attention sees equals the offset in a cache re-positioned from 0.
    fn reposition_sinks(&self, slots: &LayerSlots, li: usize, sinks: usize) -> Result<()> {
        let heads = self.layout.kv_heads;
        // Evicted tokens per row: positions seen minus entries held (the same for every head).
        let shift: Vec<usize> = (0..self.batch)
            .map(|b| {
                let held = slots.pos[b * heads * self.cap..][..self.fill].iter().filter(|&&p| p >= 0).count();
                self.lens[b] - held
            })
            .collect();
        if shift.iter().all(|&s| s == 0) {
            return Ok(());
        }
        let (b, d) = (self.batch, self.layout.head_dim);
        let keys = Tensor::from_vec(slots.sink_keys.clone(), (b, heads, sinks, d), &self.layout.device)?;
        let at: Vec<usize> = shift.iter().flat_map(|&s| std::iter::repeat_n(s, sinks)).collect();
        let moved: Vec<f32> = self.layout.ropes[li].apply_at(&keys, &at)?.flatten_all()?.to_vec1()?;
        // Sink j sits wherever position j is held (a short first prompt puts it past slot j).
        let mut rows = vec![];
        for r in 0..self.rows() {
            for (s, &p) in slots.pos[r * self.cap..][..self.fill].iter().enumerate() {
                if p >= 0 && (p as usize) < sinks {
                    rows.push((r * sinks + p as usize, r * self.cap + s));
                }
            }
        }
        slots.k.inplace_op1(&CopyRows { src: Some(&moved), rows: &rows, d })?;
        Ok(())
    }
}

/// Copies rows of D floats into a contiguous `(.., cap, D)` tensor, `(from, to)` row pairs: from
/// `src` when given, else from the tensor itself (moving entries between slots).
struct CopyRows<'a> {
    src: Option<&'a [f32]>,
    rows: &'a [(usize, usize)],
    d: usize,
}

impl InplaceOp1 for CopyRows<'_> {
    fn name(&self) -> &'static str {
        "kv-copy-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("kv slots must be f32") };
        let Some((o, _)) = layout.contiguous_offsets() else { candle_core::bail!("kv slots must be contiguous") };
        let d = self.d;
        for &(from, to) in self.rows {
            match self.src {
                Some(src) => data[o + to * d..o + (to + 1) * d].copy_from_slice(&src[from * d..(from + 1) * d]),
                None => data.copy_within(o + from * d..o + (from + 1) * d, o + to * d),
            }
        }
        Ok(())
    }
}

impl KvCache for BoundedCache {
    fn begin_step(&mut self, step: &Step) -> Result<()> {
        step.check(&self.lens)?;
        // The first allocation leaves room for the budget plus steps of this size.
        let need = if self.cap == 0 { self.max_keep.max(self.fill) + step.t } else { self.fill + step.t };
        self.reserve(need)?;
        for l in 0..self.layers.len() {
            if self.layers[l].is_none() {
                self.layers[l] = Some(self.new_layer()?);
            }
        }
        let (cap, fill, heads) = (self.cap, self.fill, self.layout.kv_heads);
        for slots in self.layers.iter_mut().flatten() {
            for b in 0..self.batch {
                for h in 0..heads {
                    let base = (b * heads + h) * cap + fill;
                    for i in 0..step.t {
                        slots.pos[base + i] = if i < step.lens[b] { (step.start[b] + i) as i64 } else { -1 };
                        slots.score[base + i] = 0.0;
                    }
                }
            }
        }
        self.shared_mask.clear();
        self.step = Some(step.clone());
        Ok(())
    }

    fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<KvView> {
        let Some(step) = self.step.clone() else {
            return Err(Error::InvalidInput("update outside a step".into()));
        };
        let (fill, t, heads, d) = (self.fill, step.t, self.layout.kv_heads, self.layout.head_dim);
        if k.dims() != [self.batch, heads, t, d] || v.dims() != k.dims() {
            return Err(Error::InvalidInput(format!(
                "keys {:?} / values {:?} for a {:?} step",
                k.dims(),
                v.dims(),
                [self.batch, heads, t, d]
            )));
        }
        let Some(slots) = self.layers.get_mut(layer).and_then(Option::as_mut) else {
            return Err(Error::InvalidInput(format!("layer {layer} out of range")));
        };
        if let Rule::Window { sinks, reposition: true } = self.rule {
            // Keep the original keys of sinks arriving in this step.
            if sinks > 0 && (0..self.batch).any(|b| step.start[b] < sinks && step.lens[b] > 0) {
                let new: Vec<f32> = k.flatten_all()?.to_vec1()?;
                for b in 0..self.batch {
                    for i in 0..step.lens[b] {
                        let p = step.start[b] + i;
                        if p >= sinks {
                            break;
                        }
                        for h in 0..heads {
                            let src = ((b * heads + h) * t + i) * d;
                            let dst = ((b * heads + h) * sinks + p) * d;
                            slots.sink_keys[dst..dst + d].copy_from_slice(&new[src..src + d]);
                        }
                    }
                }
            }
        }
        let Some(slots) = self.layers.get(layer).and_then(Option::as_ref) else {
            return Err(Error::InvalidInput(format!("layer {layer} out of range")));
        };
        if let Rule::Window { sinks, reposition: true } = self.rule {
            if sinks > 0 {
                self.reposition_sinks(slots, layer, sinks)?;
            }
        }
        slots.k.slice_set(&k.contiguous()?, 2, fill)?;
        slots.v.slice_set(&v.contiguous()?, 2, fill)?;
        let mask = match self.rule {
            Rule::Window { .. } => match self.shared_mask.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = self.mask(&slots.pos, &step, window, 1)?;
                    self.shared_mask.push((window, m.clone()));
                    m
                }
            },
            Rule::H2o { .. } => self.mask(&slots.pos, &step, window, heads)?,
        };
        let l = fill + t;
        Ok(KvView { k: slots.k.narrow(2, 0, l)?, v: slots.v.narrow(2, 0, l)?, mask, causal: None })
    }

    fn wants_probs(&self) -> bool {
        matches!(self.rule, Rule::H2o { .. })
    }

    fn observe(&mut self, layer: usize, mass: &Tensor) -> Result<()> {
        let Rule::H2o { agg } = self.rule else { return Ok(()) };
        let (heads, g, l, cap) = (
            self.layout.kv_heads,
            self.layout.num_heads / self.layout.kv_heads,
            self.fill + self.step.as_ref().map_or(0, |s| s.t),
            self.cap,
        );
        let Some(slots) = self.layers.get_mut(layer).and_then(Option::as_mut) else {
            return Err(Error::InvalidInput(format!("observe for layer {layer} before its update")));
        };
        let (mb, mh, ml) = mass.dims3()?;
        if (mb, mh, ml) != (self.batch, heads * g, l) {
            return Err(Error::InvalidInput(format!(
                "attention mass {:?}, expected {:?}",
                mass.dims(),
                (self.batch, heads * g, l)
            )));
        }
        let m: Vec<f32> = mass.flatten_all()?.to_vec1()?;
        for b in 0..self.batch {
            for h in 0..heads {
                let base = (b * heads + h) * cap;
                for s in 0..l {
                    if slots.pos[base + s] < 0 {
                        continue;
                    }
                    let per_head = (0..g).map(|gi| m[((b * heads + h) * g + gi) * l + s]);
                    slots.score[base + s] += match agg {
                        Aggregate::Sum => per_head.sum::<f32>(),
                        Aggregate::Mean => per_head.sum::<f32>() / g as f32,
                        Aggregate::Max => per_head.fold(f32::NEG_INFINITY, f32::max),
                    };
                }
            }
        }
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        let Some(step) = self.step.take() else { return Ok(()) };
        self.fill += step.t;
        for b in 0..self.batch {
            self.lens[b] += step.lens[b];
        }
        if !self.deferring {
            self.evict()?;
        }
        Ok(())
    }

    fn prefill_chunk(&self) -> Option<usize> {
        match self.prefill {
            Prefill::Full => None,
            Prefill::Bounded(c) => Some(c),
        }
    }

    fn end_prefill(&mut self) -> Result<()> {
        if self.deferring {
            self.deferring = false;
            self.evict()?;
            // The prompt's extra slots go back: from now on memory is the budget plus spare.
            let target = self.max_keep + DECODE_SPARE;
            if self.cap > target {
                self.resize(target)?;
            }
        }
        Ok(())
    }

    fn seq_len(&self, b: usize) -> usize {
        self.lens[b]
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn resident_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|s| (2 * self.rows() * self.cap * self.layout.head_dim + s.sink_keys.len()) * 4)
            .sum()
    }

    fn describe(&self) -> String {
        let what = match self.rule {
            Rule::Window { sinks, reposition } => {
                format!("window ({sinks} sinks, positions {})", if reposition { "by cache index" } else { "original" })
            }
            Rule::H2o { agg } => format!("h2o (heavy hitters, {agg:?} over query heads)"),
        };
        let b = &self.budgets[0];
        format!("{what}: {} slots ({} recent) per row and KV head, {} allocated", b.keep, b.recent, self.cap)
    }
}
