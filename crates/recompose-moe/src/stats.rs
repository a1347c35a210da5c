//! Per-channel activation statistics of every layer's FFN: the mean |a| of each channel of the
//! down projection's input, `a = act(gate(x)) * up(x)`, over the real tokens of a calibration
//! set. Read-ME ranks channels per data domain by these means.

use crate::{Error, Result};
use candle_core::Tensor;
use recompose_llm::ffn::{Ffn, FfnContext, FfnOutput};
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Sums of |a| per layer and channel, and the tokens they were taken over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChannelStats {
    /// What the statistics were taken on (a domain's name), for reports.
    pub name: String,
    /// `sums[layer][channel]`: the sum of |a| over `tokens` tokens.
    pub sums: Vec<Vec<f64>>,
    pub tokens: u64,
}

impl ChannelStats {
    /// Mean |a| of every channel of `layer`.
    pub fn mean(&self, layer: usize) -> Vec<f64> {
        let n = self.tokens.max(1) as f64;
        self.sums[layer].iter().map(|s| s / n).collect()
    }

    pub fn layers(&self) -> usize {
        self.sums.len()
    }

    pub fn channels(&self) -> usize {
        self.sums.first().map_or(0, Vec::len)
    }
}

/// What an observer is handed while rows run: the row (of the rows given), the layer, the FFN's
/// input `(tokens, hidden)` and |a| of each of the row's tokens, in order.
pub type Sink = dyn Fn(usize, usize, &Tensor, &[Vec<f32>]) + Send + Sync;

/// Stands in for a dense FFN while it is observed: the same output, and |a| of every real token
/// handed to the sink.
struct Recorder {
    inner: Arc<Box<dyn Ffn>>,
    sink: Arc<Sink>,
    row: Arc<AtomicUsize>,
}

impl Ffn for Recorder {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        let Some(dense) = self.inner.as_dense() else {
            return Err(recompose_llm::Error::InvalidInput(format!(
                "layer {}: channel statistics need a dense FFN",
                ctx.layer
            )));
        };
        if ctx.batch != 1 || ctx.lens.first() != Some(&ctx.t) {
            return Err(recompose_llm::Error::InvalidInput("observed rows run one at a time, unpadded".into()));
        }
        let a = dense.hidden(x, None, None)?;
        let rows: Vec<Vec<f32>> = a.abs()?.to_vec2()?;
        (self.sink)(self.row.load(Ordering::Relaxed), ctx.layer, x, &rows);
        Ok(FfnOutput::plain(dense.down.forward(&a)?))
    }
}

/// Runs every row of `rows` (token ids, each a separate sequence) through `model` with every
/// layer's dense FFN observed by `sink`. `progress(done, total)` follows the rows. The model's
/// FFNs are its own again afterwards, whether or not this succeeded.
pub fn observe(
    model: &mut Model,
    rows: &[Vec<u32>],
    sink: Arc<Sink>,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(Error::Data("no calibration tokens".into()));
    }
    let row = Arc::new(AtomicUsize::new(0));
    let mut originals: Vec<Arc<Box<dyn Ffn>>> = vec![];
    let mut wrapped = Ok(());
    for (li, block) in model.layers.iter_mut().enumerate() {
        if block.ffn.as_dense().is_none() {
            wrapped = Err(Error::Config(format!("layer {li}: channel statistics need a dense FFN")));
            break;
        }
        let inner = Arc::new(std::mem::replace(&mut block.ffn, Box::new(Hollow)));
        block.ffn = Box::new(Recorder { inner: inner.clone(), sink: sink.clone(), row: row.clone() });
        originals.push(inner);
    }
    let run = wrapped.and_then(|()| {
        for (i, r) in rows.iter().enumerate() {
            row.store(i, Ordering::Relaxed);
            let mut cache = model.new_cache(1);
            let (t, step) = step_for(std::slice::from_ref(r), &cache, 0);
            model.forward(&t, &step, &mut cache, Logits::Last)?;
            progress(i + 1, rows.len());
        }
        Ok(())
    });
    // Dropping the recorders leaves each original with one owner again.
    for (block, inner) in model.layers.iter_mut().zip(originals) {
        block.ffn = Box::new(Hollow);
        block.ffn = Arc::try_unwrap(inner).map_err(|_| Error::Data("an FFN is still shared after the run".into()))?;
    }
    run
}

/// The FFN statistics of all tokens of `rows`, named `name` (see [`observe`]).
pub fn collect(
    model: &mut Model,
    name: &str,
    rows: &[Vec<u32>],
    progress: impl FnMut(usize, usize),
) -> Result<ChannelStats> {
    let channels: Vec<usize> = model.layers.iter().map(|b| b.ffn.as_dense().map_or(0, |d| d.gate.dims().0)).collect();
    let sums = Arc::new(Mutex::new(channels.iter().map(|&c| vec![0f64; c]).collect::<Vec<_>>()));
    let s = sums.clone();
    let sink: Arc<Sink> = Arc::new(move |_row, layer, _x: &Tensor, a: &[Vec<f32>]| {
        if let Ok(mut sums) = s.lock() {
            for row in a {
                for (x, v) in sums[layer].iter_mut().zip(row) {
                    *x += *v as f64;
                }
            }
        }
    });
    observe(model, rows, sink, progress).map_err(|e| match e {
        Error::Data(m) => Error::Data(format!("{name}: {m}")),
        e => e,
    })?;
    let sums = sums.lock().map_err(|_| Error::Data(format!("{name}: statistics poisoned")))?.clone();
    let tokens = rows.iter().map(|r| r.len() as u64).sum();
    Ok(ChannelStats { name: name.to_string(), sums, tokens })
}

/// The placeholder while an FFN is moved out of its block.
struct Hollow;

impl Ffn for Hollow {
    fn forward(&self, _x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        Err(recompose_llm::Error::InvalidInput(format!("layer {}: FFN moved out", ctx.layer)))
    }
}
