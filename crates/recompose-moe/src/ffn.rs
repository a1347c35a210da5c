//! The MoE FFN of a refactorised model: the permanent channels over every token, then each
//! token's expert over the tokens routed to it (rows grouped by expert, one matmul chain per
//! expert in the step). The result is the dense FFN with every channel outside the permanent
//! set and the token's expert masked to zero, computed without the masked channels.
//!
//! The experts are slices of the dense weights: rows of gate and up, columns of down. Packed
//! (quantised) experts stay on the packed kernels (`q8_linear` for what must be requantised);
//! f32 ones are f32 slices.

use crate::{Error, ExpertSplit, Result};
use candle_core::{DType, Device, Tensor};
use recompose_llm::ffn::{DenseFfn, Ffn, FfnContext, FfnOutput};
use recompose_llm::kernels::quant::{PackedWeight, QK};
use recompose_llm::linear::{Linear, Weight};
use std::sync::Arc;

pub struct MoeFfn {
    layer: usize,
    /// None when no channel is permanent.
    permanent: Option<DenseFfn>,
    experts: Experts,
}

/// Where a MoE layer's routed experts are.
enum Experts {
    /// In memory; None for an expert with no channels of its own.
    Resident(Vec<Option<DenseFfn>>),
    /// In an expert store, read on demand under its budget.
    Stored(Arc<crate::store::ExpertStore>),
}

/// A routed expert's part for one step: borrowed from the layer or held from the store.
enum PartRef<'a> {
    Borrowed(&'a DenseFfn),
    Held(Arc<DenseFfn>),
}

impl std::ops::Deref for PartRef<'_> {
    type Target = DenseFfn;
    fn deref(&self) -> &DenseFfn {
        match self {
            PartRef::Borrowed(p) => p,
            PartRef::Held(p) => p,
        }
    }
}

/// One part's weights in f32: gate and up `(k, hidden)`, down `(hidden, k)`.
pub struct PartWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// The name of a part's linear: `model.layers.{layer}.mlp.{part}.{proj}.weight`, `part` being
/// `permanent` or `experts.{e}`.
pub fn part_name(layer: usize, part: Option<usize>, proj: &str) -> String {
    match part {
        None => format!("model.layers.{layer}.mlp.permanent.{proj}.weight"),
        Some(e) => format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight"),
    }
}

pub const PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl MoeFfn {
    /// Cuts `dense` (layer `layer` of the model `split` was made for) into its permanent part and
    /// experts.
    pub fn from_dense(dense: &DenseFfn, split: &ExpertSplit, layer: usize) -> Result<Self> {
        let channels = dense.gate.dims().0;
        if layer >= split.layers() || split.channels != channels {
            return Err(Error::Config(format!(
                "layer {layer} of {channels} channels is not in a split of {} layers x {} channels",
                split.layers(),
                split.channels
            )));
        }
        let part = |chans: &[u32], which: Option<usize>| -> Result<Option<DenseFfn>> {
            if chans.is_empty() {
                return Ok(None);
            }
            let n = |proj: &str| part_name(layer, which, proj);
            if let (Weight::Packed(g), Weight::Packed(u)) = (&dense.gate.weight, &dense.up.weight) {
                // Gate and up rows are the source's bit for bit, padded with zero rows to a
                // block of 32 channels (a padding channel's activation is act(0) * 0 = 0).
                let padded = chans.len().next_multiple_of(QK);
                let rows = |w: &PackedWeight, name: String| -> Result<Linear> {
                    let s = w
                        .select_rows(chans, padded)
                        .ok_or_else(|| Error::Config(format!("{name}: channels outside its {} rows", w.rows())))?;
                    Ok(Linear::packed(name, Arc::new(s)))
                };
                return Ok(Some(DenseFfn {
                    gate: rows(g, n(PROJ[0]))?,
                    up: rows(u, n(PROJ[1]))?,
                    down: q8_linear(n(PROJ[2]), &cols_of(&dense.down, chans)?, false)?,
                    activation: dense.activation,
                }));
            }
            Ok(Some(DenseFfn {
                gate: Linear::dense(n(PROJ[0]), rows_of(&dense.gate, chans)?),
                up: Linear::dense(n(PROJ[1]), rows_of(&dense.up, chans)?),
                down: Linear::dense(n(PROJ[2]), cols_of(&dense.down, chans)?),
                activation: dense.activation,
            }))
        };
        Ok(Self {
            layer,
            permanent: part(&split.permanent[layer], None)?,
            experts: Experts::Resident(
                split.experts[layer].iter().enumerate().map(|(e, c)| part(c, Some(e))).collect::<Result<_>>()?,
            ),
        })
    }

    /// From stored f32 weights (fine-tuned experts): f32 linears, or, with `packed`, on the
    /// packed kernels (requantised to Q8_0).
    pub fn from_weights(
        layer: usize,
        permanent: Option<PartWeights>,
        experts: Vec<Option<PartWeights>>,
        activation: recompose_core::config::Activation,
        packed: bool,
    ) -> Result<Self> {
        let part = |w: Option<PartWeights>, which: Option<usize>| -> Result<Option<DenseFfn>> {
            let Some(w) = w else { return Ok(None) };
            let n = |proj: &str| part_name(layer, which, proj);
            let lin = |name: String, t: Tensor, rows: bool| -> Result<Linear> {
                if packed {
                    q8_linear(name, &t, rows)
                } else {
                    Ok(Linear::dense(name, t))
                }
            };
            Ok(Some(DenseFfn {
                gate: lin(n(PROJ[0]), w.gate, true)?,
                up: lin(n(PROJ[1]), w.up, true)?,
                down: lin(n(PROJ[2]), w.down, false)?,
                activation,
            }))
        };
        Ok(Self {
            layer,
            permanent: part(permanent, None)?,
            experts: Experts::Resident(
                experts.into_iter().enumerate().map(|(e, w)| part(w, Some(e))).collect::<Result<_>>()?,
            ),
        })
    }

    /// A layer from its parts as they are: the permanent one and each expert's (None: no
    /// channels of its own). The experts' shapes must agree with `permanent`'s and the input.
    pub fn from_parts(layer: usize, permanent: Option<DenseFfn>, experts: Vec<Option<DenseFfn>>) -> Self {
        Self { layer, permanent, experts: Experts::Resident(experts) }
    }

    pub fn experts(&self) -> usize {
        match &self.experts {
            Experts::Resident(v) => v.len(),
            Experts::Stored(s) => s.experts(),
        }
    }

    /// The resident experts that have channels, by index (None once they are in a store).
    pub fn resident_experts(&self) -> Option<impl Iterator<Item = (usize, &DenseFfn)>> {
        match &self.experts {
            Experts::Resident(v) => Some(v.iter().enumerate().filter_map(|(e, p)| Some((e, p.as_ref()?)))),
            Experts::Stored(_) => None,
        }
    }

    /// This layer with its routed experts read from `store` instead of memory (the caller
    /// has checked that the store holds this MoE's experts).
    pub fn into_stored(self, store: Arc<crate::store::ExpertStore>) -> Self {
        Self { experts: Experts::Stored(store), ..self }
    }

    /// The parts of `need` (experts with tokens this step, ascending), from memory or the store.
    fn parts(&self, need: &[u32]) -> recompose_llm::Result<Vec<(u32, Option<PartRef<'_>>)>> {
        match &self.experts {
            Experts::Resident(v) => {
                Ok(need.iter().map(|&e| (e, v[e as usize].as_ref().map(PartRef::Borrowed))).collect())
            }
            Experts::Stored(store) => {
                if self.layer == 0 {
                    store.begin_step(need);
                }
                let got =
                    store.parts(self.layer, need).map_err(|e| recompose_llm::Error::InvalidInput(e.to_string()))?;
                Ok(got.into_iter().map(|(e, p)| (e, p.map(PartRef::Held))).collect())
            }
        }
    }

    /// Makes every part's weights trainable `Var`s (f32 parts only) and returns them by name.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, candle_core::Var)>> {
        let mut vars = vec![];
        let Experts::Resident(experts) = &mut self.experts else {
            return Err(Error::Config("experts in a store do not train".into()));
        };
        for part in self.permanent.iter_mut().chain(experts.iter_mut().flatten()) {
            for l in [&mut part.gate, &mut part.up, &mut part.down] {
                let w = l.dense_weight().ok_or_else(|| {
                    Error::Config(format!("{}: packed experts do not train (load the model with --f32)", l.name))
                })?;
                let v = candle_core::Var::from_tensor(&w.detach())?;
                *l = Linear::dense(l.name.clone(), v.as_tensor().clone());
                vars.push((l.name.clone(), v));
            }
        }
        Ok(vars)
    }
}

/// `w (rows, cols)` in f32 on the packed kernels as Q8_0, with its channel axis (rows with
/// `rows`, else columns) padded with zeros to a whole block of 32. A part's down columns cut
/// across its source's quant blocks, so they are gathered in f32 and requantised (8 bits: less
/// rounding than the 4-bit source they came from).
fn q8_linear(name: String, w: &Tensor, rows: bool) -> Result<Linear> {
    let (r, c) = w.dims2()?;
    let (axis, k) = if rows { (0, r) } else { (1, c) };
    let w = w.to_dtype(DType::F32)?.pad_with_zeros(axis, 0, k.next_multiple_of(QK) - k)?;
    let (r, c) = w.dims2()?;
    let p = PackedWeight::q8_0_from_f32(&w.flatten_all()?.to_vec1::<f32>()?, r, c)
        .ok_or_else(|| Error::Config(format!("{name}: {r} x {c} does not pack")))?;
    Ok(Linear::packed(name, Arc::new(p)))
}

/// `(len(chans), cols)`: rows `chans` of a linear's weight (f32 from packed ones).
fn rows_of(l: &Linear, chans: &[u32]) -> Result<Tensor> {
    match &l.weight {
        Weight::Dense(w) => {
            let idx = Tensor::new(chans, w.device())?;
            Ok(w.index_select(&idx, 0)?.contiguous()?)
        }
        Weight::Packed(p) => {
            let cols = p.cols();
            let mut out = vec![0f32; chans.len() * cols];
            for (row, &c) in out.chunks_exact_mut(cols).zip(chans) {
                p.dequantize_row(c as usize, row);
            }
            Ok(Tensor::from_vec(out, (chans.len(), cols), &Device::Cpu)?)
        }
    }
}

/// `(rows, len(chans))`: columns `chans` of a linear's weight (f32 from packed ones).
fn cols_of(l: &Linear, chans: &[u32]) -> Result<Tensor> {
    match &l.weight {
        Weight::Dense(w) => {
            let idx = Tensor::new(chans, w.device())?;
            Ok(w.index_select(&idx, 1)?.contiguous()?)
        }
        Weight::Packed(p) => {
            let (rows, cols) = (p.rows(), p.cols());
            let mut full = vec![0f32; cols];
            let mut out = Vec::with_capacity(rows * chans.len());
            for r in 0..rows {
                p.dequantize_row(r, &mut full);
                out.extend(chans.iter().map(|&c| full[c as usize]));
            }
            Ok(Tensor::from_vec(out, (rows, chans.len()), &Device::Cpu)?)
        }
    }
}

fn run(part: &DenseFfn, x: &Tensor) -> recompose_llm::Result<Tensor> {
    part.down.forward(&part.hidden(x, None, None)?)
}

impl Ffn for MoeFfn {
    fn upcoming(&self, steps: &[Vec<u32>]) {
        // One store serves every layer: the first tells it.
        if let (Experts::Stored(store), 0) = (&self.experts, self.layer) {
            store.set_lookahead(steps.to_vec());
        }
    }

    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        let bad = |m: String| recompose_llm::Error::InvalidInput(m);
        let (n, hidden) = x.dims2()?;
        let permanent = || match &self.permanent {
            Some(p) => run(p, x),
            None => Ok(Tensor::zeros((n, hidden), x.dtype(), x.device())?),
        };
        // A model pruned to its permanent channels has nothing to route.
        let pruned = matches!(&self.experts, Experts::Resident(v) if v.iter().all(Option::is_none));
        if pruned && ctx.route.is_none() {
            return Ok(FfnOutput::plain(permanent()?));
        }
        let Some(route) = ctx.route else {
            return Err(bad(format!(
                "layer {}: the MoE FFN needs each token's expert (the router's routes)",
                self.layer
            )));
        };
        if route.len() != n {
            return Err(bad(format!("layer {}: {} routes for {n} tokens", self.layer, route.len())));
        }
        if let Some(&e) = route.iter().find(|&&e| e as usize >= self.experts()) {
            return Err(bad(format!("layer {}: route to expert {e} of {}", self.layer, self.experts())));
        }
        let mut usage = vec![0u64; self.experts()];
        for (i, &e) in route.iter().enumerate() {
            if i % ctx.t.max(1) < ctx.lens[ctx.sequence_of(i)] {
                usage[e as usize] += 1;
            }
        }
        // Every token to one expert (a decode step of one sequence, a prefill chunk of one
        // domain): no rows to gather, and the permanent part's and the expert's gate and up
        // projections read the input together.
        let mut need: Vec<u32> = route.to_vec();
        need.sort_unstable();
        need.dedup();
        let parts = self.parts(&need)?;
        if let Some(p) = &self.permanent {
            if need.len() == 1 {
                let Some(part) = parts.first().and_then(|(_, p)| p.as_ref()) else {
                    return Ok(FfnOutput { y: run(p, x)?, aux_loss: None, usage: Some(usage) });
                };
                let wide = |l: &Linear| l.dims().0;
                let [pg, pu, eg, eu] = recompose_llm::linear::forward_group(
                    [
                        (&p.gate, wide(&p.gate), None),
                        (&p.up, wide(&p.up), None),
                        (&part.gate, wide(&part.gate), None),
                        (&part.up, wide(&part.up), None),
                    ],
                    x,
                )?;
                let ap = recompose_llm::grad::gated(&pg, &pu, p.activation)?;
                let ae = recompose_llm::grad::gated(&eg, &eu, part.activation)?;
                let y = (p.down.forward(&ap)? + part.down.forward(&ae)?)?;
                return Ok(FfnOutput { y, aux_loss: None, usage: Some(usage) });
            }
        }
        let mut y = permanent()?;
        for (e, part) in &parts {
            let Some(part) = part else { continue };
            let rows: Vec<u32> = (0..n as u32).filter(|&i| route[i as usize] == *e).collect();
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            let ye = run(part, &x.index_select(&idx, 0)?)?;
            y = y.index_add(&idx, &ye, 0)?;
        }
        Ok(FfnOutput { y, aux_loss: None, usage: Some(usage) })
    }
}

/// Every layer of `model` cut into its MoE under `split` (checked against the model first).
pub fn cut(model: &recompose_llm::Model, split: &ExpertSplit) -> Result<Vec<MoeFfn>> {
    let channels = model.layers.first().and_then(|b| b.ffn.as_dense()).map_or(0, |d| d.gate.dims().0);
    split.check(model.layers.len(), channels)?;
    model
        .layers
        .iter()
        .enumerate()
        .map(|(l, block)| {
            let dense = block.ffn.as_dense().ok_or_else(|| Error::Config(format!("layer {l}: not a dense FFN")))?;
            MoeFfn::from_dense(dense, split, l)
        })
        .collect()
}

/// What routes a MoE's tokens.
pub enum Routing<'a> {
    /// Nothing is routed: a split whose channels are all permanent (the pruned baseline).
    None,
    /// The pre-gating router, in front of the blocks.
    PreGate(recompose_llm::pregate::PreGate),
    /// One gate per layer over its FFN input.
    Layerwise(&'a crate::layerwise::Gates),
}

/// Puts `moes` (one per layer) into `model` as its FFNs, routed by `routing`: behind each
/// layer's gate, or with the router in front of the blocks (replacing any it had).
pub fn install(model: &mut recompose_llm::Model, moes: Vec<MoeFfn>, routing: Routing) -> Result<()> {
    let (router, ffns): (_, Vec<Box<dyn Ffn>>) = match routing {
        Routing::Layerwise(g) => (None, crate::layerwise::behind_gates(moes, g, model.dtype(), model.device())?),
        Routing::PreGate(r) => (Some(r), moes.into_iter().map(|m| Box::new(m) as Box<dyn Ffn>).collect()),
        Routing::None => (None, moes.into_iter().map(|m| Box::new(m) as Box<dyn Ffn>).collect()),
    };
    if ffns.len() != model.layers.len() {
        return Err(Error::Config(format!("{} MoE layers for a model of {}", ffns.len(), model.layers.len())));
    }
    for (b, f) in model.layers.iter_mut().zip(ffns) {
        b.ffn = f;
    }
    model.set_pregate(router);
    Ok(())
}

/// Runs `f` on `model` with every layer's dense FFN replaced by its MoE cut under `split`; the
/// dense FFNs are back afterwards, whatever `f` gave.
pub fn with_moe<R, E: From<Error>>(
    model: &mut recompose_llm::Model,
    split: &ExpertSplit,
    f: impl FnOnce(&recompose_llm::Model) -> std::result::Result<R, E>,
) -> std::result::Result<R, E> {
    let moes = cut(model, split)?.into_iter().map(|m| Box::new(m) as Box<dyn Ffn>).collect();
    with_ffns(model, moes, f)
}

/// Runs `f` on `model` with its FFNs replaced by `ffns` (one per layer); the model's own are
/// back afterwards, whatever `f` gave.
pub fn with_ffns<R, E: From<Error>>(
    model: &mut recompose_llm::Model,
    ffns: Vec<Box<dyn Ffn>>,
    f: impl FnOnce(&recompose_llm::Model) -> std::result::Result<R, E>,
) -> std::result::Result<R, E> {
    if ffns.len() != model.layers.len() {
        return Err(Error::Config(format!("{} FFNs for {} layers", ffns.len(), model.layers.len())).into());
    }
    let own: Vec<Box<dyn Ffn>> =
        model.layers.iter_mut().zip(ffns).map(|(b, m)| std::mem::replace(&mut b.ffn, m)).collect();
    let out = f(model);
    for (b, d) in model.layers.iter_mut().zip(own) {
        b.ffn = d;
    }
    out
}
