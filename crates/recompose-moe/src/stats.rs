//! Per-channel activation statistics of every layer's FFN: the mean |a| of each channel of the
//! down projection's input, `a = act(gate(x)) * up(x)`, over the real tokens of a calibration
//! set. Read-ME ranks channels per data domain by these means.

use crate::{Error, Result};
use candle_core::Tensor;
use recompose_llm::ffn::{Ffn, FfnContext, FfnOutput};
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model};
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

/// Stands in for a dense FFN while statistics are taken: the same output, and the |a| of every
/// real row added to `sums`.
struct Recorder {
    inner: Arc<Box<dyn Ffn>>,
    sums: Arc<Mutex<Vec<f64>>>,
}

impl Ffn for Recorder {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        let Some(dense) = self.inner.as_dense() else {
            return Err(recompose_llm::Error::InvalidInput(format!(
                "layer {}: channel statistics need a dense FFN",
                ctx.layer
            )));
        };
        let a = dense.hidden(x, None, None)?;
        let rows: Vec<Vec<f32>> = a.abs()?.to_vec2()?;
        let mut sums =
            self.sums.lock().map_err(|_| recompose_llm::Error::InvalidInput("statistics poisoned".into()))?;
        for (i, row) in rows.iter().enumerate() {
            // Padding columns carry no text.
            if i % ctx.t.max(1) < ctx.lens[ctx.sequence_of(i)] {
                for (s, v) in sums.iter_mut().zip(row) {
                    *s += *v as f64;
                }
            }
        }
        Ok(FfnOutput::plain(dense.down.forward(&a)?))
    }
}

/// Runs every row of `rows` (token ids, each a separate sequence) through `model` and returns the
/// FFN statistics of all their tokens, named `name`. `progress(done, total)` follows the rows.
/// The model's FFNs are its own again afterwards, whether or not this succeeded.
pub fn collect(
    model: &mut Model,
    name: &str,
    rows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<ChannelStats> {
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(Error::Data(format!("{name}: no calibration tokens")));
    }
    let mut originals: Vec<Arc<Box<dyn Ffn>>> = vec![];
    let mut sums = vec![];
    let mut wrapped = Ok(());
    for (li, block) in model.layers.iter_mut().enumerate() {
        let Some(channels) = block.ffn.as_dense().map(|d| d.gate.dims().0) else {
            wrapped = Err(Error::Config(format!("layer {li}: channel statistics need a dense FFN")));
            break;
        };
        let s = Arc::new(Mutex::new(vec![0f64; channels]));
        let inner = Arc::new(std::mem::replace(&mut block.ffn, Box::new(Hollow)));
        block.ffn = Box::new(Recorder { inner: inner.clone(), sums: s.clone() });
        originals.push(inner);
        sums.push(s);
    }
    let run = wrapped.and_then(|()| {
        let mut tokens = 0u64;
        for (i, row) in rows.iter().enumerate() {
            let mut cache = model.new_cache(1);
            let (t, step) = step_for(std::slice::from_ref(row), &cache, 0);
            model.forward(&t, &step, &mut cache, Logits::Last)?;
            tokens += row.len() as u64;
            progress(i + 1, rows.len());
        }
        Ok(tokens)
    });
    // Dropping the recorders leaves each original with one owner again.
    for (block, inner) in model.layers.iter_mut().zip(originals) {
        block.ffn = Box::new(Hollow);
        block.ffn = Arc::try_unwrap(inner).map_err(|_| Error::Data("an FFN is still shared after the run".into()))?;
    }
    let tokens = run?;
    let sums = sums
        .into_iter()
        .map(|s| Arc::try_unwrap(s).ok().and_then(|m| m.into_inner().ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Data(format!("{name}: statistics still shared after the run")))?;
    Ok(ChannelStats { name: name.to_string(), sums, tokens })
}

/// The placeholder while an FFN is moved out of its block.
struct Hollow;

impl Ffn for Hollow {
    fn forward(&self, _x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        Err(recompose_llm::Error::InvalidInput(format!("layer {}: FFN moved out", ctx.layer)))
    }
}
