//! Fine-tuning the experts of a refactorised model with the LM loss: every part's f32 weights
//! trainable, everything else (attention, embeddings, norms, and the router or the layer-wise
//! gates, which route each row as they will at run time) frozen. The same runs the pruned
//! baseline (a split whose
//! channels are all permanent, nothing routed), so the two get the same token budget through the
//! same loop: recompose-train's, with its schedule, clipping, held-out checks, log and
//! checkpoints.

use crate::{ffn, ExpertSplit, Result, Routing};
use candle_core::{Tensor, Var};
use recompose_llm::Model;
use recompose_train::data::{Dataset, Example};
use recompose_train::finetune::{self, FinetuneConfig, Observer, Paths, Summary};

/// The fine-tuning recipe for `steps` steps of `batch` rows at peak learning rate `lr`: AdamW
/// without weight decay, a tenth of the steps warming up, cosine to a tenth, gradients clipped
/// to norm 1, held-out checks at the start and the end, one checkpoint at the end.
pub fn config(steps: usize, batch: usize, lr: f64) -> FinetuneConfig {
    FinetuneConfig {
        mode: recompose_train::finetune::Mode::Full,
        steps,
        batch,
        accum: 1,
        schedule: recompose_train::Schedule {
            peak: lr,
            warmup: steps.div_ceil(10),
            total: steps,
            decay: recompose_train::Decay::Cosine,
            min_ratio: 0.1,
        },
        optimizer: recompose_train::OptimizerKind::adamw(0.0),
        clip: Some(1.0),
        seed: 0,
        eval_every: 0,
        eval_rows: 0,
        checkpoint_every: 0,
        activation_checkpointing: false,
        stop_after: None,
    }
}

/// Rows of tokens as next-token examples (token `i + 1` predicted from the first `i + 1`).
pub fn dataset(rows: &[Vec<u32>], describe: &str) -> Dataset {
    let examples = rows
        .iter()
        .filter(|r| r.len() >= 2)
        .map(|r| Example { tokens: r[..r.len() - 1].to_vec(), targets: r[1..].to_vec() })
        .collect();
    Dataset::new(examples, describe.to_string())
}

/// Cuts `model` (loaded in f32) under `split` with every part's weights trainable (registered
/// as the model's parameters) and routed by `routing`; returns the parts' `Var`s.
pub fn prepare(model: &mut Model, split: &ExpertSplit, routing: Routing) -> Result<Vec<(String, Var)>> {
    let mut moes = ffn::cut(model, split)?;
    let mut vars = vec![];
    for m in &mut moes {
        vars.extend(m.make_trainable()?);
    }
    ffn::install(model, moes, routing)?;
    model.add_params(vars.clone());
    Ok(vars)
}

/// [`prepare`]s `model` (loaded in f32) under `split` and `routing`, trains every
/// part for `cfg.steps` steps on `train` (held-out checks on `held`), and returns the run's
/// summary with the trained weights by name (what `MoeModel::experts` holds). The model is
/// left as trained.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &mut Model,
    base: &str,
    split: &ExpertSplit,
    routing: Routing,
    train: &Dataset,
    held: &Dataset,
    cfg: &FinetuneConfig,
    paths: &Paths,
    obs: &mut dyn Observer,
) -> Result<(Summary, Vec<(String, Tensor)>)> {
    let vars = prepare(model, split, routing)?;
    let summary = finetune::run(model, base, train, held, cfg, paths, false, obs)?;
    let weights = vars.into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect();
    Ok((summary, weights))
}
