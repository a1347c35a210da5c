//! The test oracle: a deliberately simple implementation of the same policies. It keeps every
//! key and value ever seen, marks evicted ones dead and hides them with the attention mask,
//! re-rotates keys from scratch for the cache-index position scheme, and decides evictions by
//! repeatedly removing the worst entry. Slow and memory-hungry by design; the bounded cache must
//! produce the same logits.

use crate::spec::{Aggregate, KvSpec, Positions, Prefill, RowBudget};
use candle_core::{Device, Tensor};
use recompose_llm::kv::{CacheLayout, KvCache, KvView, Step, MASKED};
use recompose_llm::{Error, Result};

pub struct MaskOracle {
    layout: CacheLayout,
    spec: KvSpec,
    budgets: Vec<RowBudget>,
    deferring: bool,
    /// Per layer: every key/value `(B, Hkv, columns, D)`.
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Per row: the position of every column (-1 for padding).
    col_pos: Vec<Vec<i64>>,
    /// Per layer, row, head: alive flag and accumulated score of every column.
    alive: Vec<Vec<Vec<Vec<bool>>>>,
    score: Vec<Vec<Vec<Vec<f32>>>>,
    lens: Vec<usize>,
    step: Option<Step>,
}

impl MaskOracle {
    pub fn new(layout: &CacheLayout, spec: &KvSpec, prompt_lens: &[usize]) -> Self {
        let (b, l, h) = (prompt_lens.len(), layout.num_layers, layout.kv_heads);
        Self {
            layout: layout.clone(),
            spec: spec.clone(),
            budgets: spec.row_budgets(prompt_lens).unwrap_or_default(),
            deferring: spec.prefill() == Prefill::Full,
            k: vec![None; l],
            v: vec![None; l],
            col_pos: vec![vec![]; b],
            alive: vec![vec![vec![vec![]; h]; b]; l],
            score: vec![vec![vec![vec![]; h]; b]; l],
            lens: vec![0; b],
            step: None,
        }
    }

    fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Whether the rule keeps `pos` unconditionally, for a row that has seen `n` tokens.
    fn protected(&self, row: usize, pos: i64, n: usize) -> bool {
        let budget = self.budgets[row];
        let sinks = match self.spec {
            KvSpec::Window { sinks, .. } => sinks as i64,
            _ => 0,
        };
        pos < sinks || pos >= n as i64 - budget.recent as i64
    }

    fn evict(&mut self) {
        if self.spec.is_full() {
            return;
        }
        for li in 0..self.layout.num_layers {
            let window = self.layout.windows[li];
            for b in 0..self.batch() {
                let n = self.lens[b];
                for h in 0..self.layout.kv_heads {
                    loop {
                        let alive = &self.alive[li][b][h];
                        if alive.iter().filter(|&&a| a).count() <= self.budgets[b].keep {
                            break;
                        }
                        // The worst unprotected entry: stale (out of a sliding window) first,
                        // then the lowest score, then the oldest.
                        let mut worst: Option<usize> = None;
                        for (c, &live) in alive.iter().enumerate() {
                            let p = self.col_pos[b][c];
                            if !live || self.protected(b, p, n) {
                                continue;
                            }
                            let key = |c: usize| {
                                let p = self.col_pos[b][c];
                                let stale = window.is_some_and(|w| n as i64 - p >= w as i64);
                                let score = match self.spec {
                                    KvSpec::H2o { .. } => self.score[li][b][h][c],
                                    _ => 0.0,
                                };
                                (!stale, score, p)
                            };
                            if worst.is_none_or(|w| key(c).partial_cmp(&key(w)) == Some(std::cmp::Ordering::Less)) {
                                worst = Some(c);
                            }
                        }
                        match worst {
                            Some(c) => self.alive[li][b][h][c] = false,
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// Keys moved to positions by cache index: a kept key's offset to every query equals the
    /// difference of their indices among the kept tokens.
    fn reposition(&self, li: usize, k: &Tensor, step: &Step) -> Result<Tensor> {
        let cols = k.dim(2)?;
        let mut at = vec![0usize; self.batch() * cols];
        for b in 0..self.batch() {
            // Head 0 stands for all: the window rule treats heads alike.
            let alive = &self.alive[li][b][0];
            let held_old = (0..alive.len()).filter(|&c| alive[c]).count();
            let evicted = step.start[b] - held_old;
            let mut index = 0;
            for c in 0..alive.len() {
                if alive[c] {
                    let p = self.col_pos[b][c] as usize;
                    at[b * cols + c] = index + evicted - p;
                    index += 1;
                }
            }
        }
        self.layout.ropes[li].apply_at(k, &at)
    }
}

impl KvCache for MaskOracle {
    fn begin_step(&mut self, step: &Step) -> Result<()> {
        step.check(&self.lens)?;
        self.step = Some(step.clone());
        Ok(())
    }

    fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<KvView> {
        let step = self.step.clone().ok_or_else(|| Error::InvalidInput("update outside a step".into()))?;
        if layer >= self.layout.num_layers {
            return Err(Error::InvalidInput(format!("layer {layer} out of range")));
        }
        let old = self.col_pos[0].len();
        let repositioned = match (&self.spec, &self.k[layer]) {
            (KvSpec::Window { positions: Positions::Cache, sinks, .. }, Some(kk)) if *sinks > 0 => {
                Some(self.reposition(layer, kk, &step)?)
            }
            _ => None,
        };
        let cat = |t: &Option<Tensor>, new: &Tensor| -> Result<Tensor> {
            Ok(match t {
                Some(t) => Tensor::cat(&[t, new], 2)?,
                None => new.clone(),
            })
        };
        let (kk, vv) = (cat(&self.k[layer], k)?, cat(&self.v[layer], v)?);
        let view_k = match repositioned {
            Some(r) => Tensor::cat(&[&r, k], 2)?,
            None => kk.clone(),
        };
        self.k[layer] = Some(kk);
        self.v[layer] = Some(vv.clone());
        let (b_, h_, t) = (self.batch(), self.layout.kv_heads, step.t);
        let l = old + t;
        let pos_of = |b: usize, c: usize| -> i64 {
            if c < old {
                self.col_pos[b][c]
            } else if c - old < step.lens[b] {
                (step.start[b] + c - old) as i64
            } else {
                -1
            }
        };
        let mut m = vec![0f32; b_ * h_ * t * l];
        for b in 0..b_ {
            for h in 0..h_ {
                for q in 0..t {
                    let qpos = (step.start[b] + q) as i64;
                    for c in 0..l {
                        let p = pos_of(b, c);
                        let alive = c >= old || self.alive[layer][b][h][c];
                        let visible = alive && p >= 0 && p <= qpos && window.is_none_or(|w| qpos - p < w as i64);
                        if !visible {
                            m[((b * h_ + h) * t + q) * l + c] = MASKED;
                        }
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b_, h_, t, l), &Device::Cpu)?;
        Ok(KvView { k: view_k, v: vv, mask: Some(mask), causal: None })
    }

    fn wants_probs(&self) -> bool {
        matches!(self.spec, KvSpec::H2o { .. })
    }

    fn observe(&mut self, layer: usize, mass: &Tensor) -> Result<()> {
        let KvSpec::H2o { agg, .. } = self.spec else { return Ok(()) };
        let (_, hq, l) = mass.dims3()?;
        let m: Vec<f32> = mass.flatten_all()?.to_vec1()?;
        let g = hq / self.layout.kv_heads;
        for b in 0..self.batch() {
            for h in 0..self.layout.kv_heads {
                let sc = &mut self.score[layer][b][h];
                sc.resize(l, 0.0);
                for (c, s) in sc.iter_mut().enumerate() {
                    let vals: Vec<f32> = (0..g).map(|gi| m[((b * hq) + h * g + gi) * l + c]).collect();
                    *s += match agg {
                        Aggregate::Sum => vals.iter().sum::<f32>(),
                        Aggregate::Mean => vals.iter().sum::<f32>() / g as f32,
                        Aggregate::Max => vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
                    };
                }
            }
        }
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        let Some(step) = self.step.take() else { return Ok(()) };
        for b in 0..self.batch() {
            for i in 0..step.t {
                let p = if i < step.lens[b] { (step.start[b] + i) as i64 } else { -1 };
                self.col_pos[b].push(p);
                for li in 0..self.layout.num_layers {
                    for h in 0..self.layout.kv_heads {
                        self.alive[li][b][h].push(p >= 0);
                        let n = self.col_pos[b].len().max(self.score[li][b][h].len());
                        self.score[li][b][h].resize(n, 0.0);
                    }
                }
            }
            self.lens[b] += step.lens[b];
        }
        if !self.deferring {
            self.evict();
        }
        Ok(())
    }

    fn prefill_chunk(&self) -> Option<usize> {
        match self.spec.prefill() {
            Prefill::Full => None,
            Prefill::Bounded(c) => Some(c),
        }
    }

    fn end_prefill(&mut self) -> Result<()> {
        if self.deferring {
            self.deferring = false;
            self.evict();
        }
        Ok(())
    }

    fn seq_len(&self, b: usize) -> usize {
        self.lens[b]
    }

    fn batch_size(&self) -> usize {
        self.batch()
    }

    fn resident_bytes(&self) -> usize {
        self.k.iter().flatten().map(|k| 2 * k.elem_count() * 4).sum()
    }

    fn describe(&self) -> String {
        format!("mask oracle for {}", self.spec)
    }
}

impl MaskOracle {
    /// Positions each (layer, row, head) holds now, for comparing decisions in tests.
    pub fn scores(&self, layer: usize, row: usize, head: usize) -> Vec<f32> {
        self.score[layer][row][head].clone()
    }

    pub fn held(&self, layer: usize, row: usize, head: usize) -> Vec<i64> {
        let Some(alive) = self.alive.get(layer).and_then(|l| l.get(row)).and_then(|r| r.get(head)) else {
            return vec![];
        };
        (0..alive.len()).filter(|&c| alive[c] && self.col_pos[row][c] >= 0).map(|c| self.col_pos[row][c]).collect()
    }
}
