//! Seeded MoE pieces for tests, here and in the crates that run a MoE (the server's): a split
//! from pseudo-random statistics, and a router and layer-wise gates whose weights are large
//! enough that their picks change from token to token.

use crate::layerwise::Gates;
use crate::{router, ChannelStats, ExpertSplit, MoeConfig, MoeModel, Result};
use recompose_core::weights::ModelFile;
use recompose_llm::pregate::PreGate;
use recompose_llm::Model;

/// A split of `model` into 3 experts (keep 0.5) from seeded pseudo-random statistics.
pub fn split(model: &Model) -> Result<ExpertSplit> {
    let channels = model.layers.first().and_then(|b| b.ffn.as_dense()).map_or(0, |d| d.gate.dims().0);
    let stats: Vec<ChannelStats> = (0..3)
        .map(|d| ChannelStats {
            name: format!("d{d}"),
            sums: (0..model.layers.len())
                .map(|l| (0..channels).map(|c| ((c * 31 + l * 7 + d * 57) % 97) as f64).collect())
                .collect(),
            tokens: 1000,
        })
        .collect();
    ExpertSplit::from_domains(&stats, 0.5)
}

/// A trainable router over 3 experts (MLP width `ffn`, seeded) whose matrices are scaled by
/// `scale` from the init's std of 0.02.
pub fn scaled_router(model: &Model, ffn: usize, seed: u64, scale: f64) -> Result<PreGate> {
    let g = router::init(model, 3, ffn, seed)?;
    for (_, v) in g.vars() {
        if v.as_tensor().rank() == 2 {
            v.set(&(v.as_tensor() * scale)?)?;
        }
    }
    Ok(g)
}

/// The MoE of [`split`] and a frozen [`scaled_router`] for `model` (made from `file`).
pub fn moe(file: &ModelFile, model: &Model, experts: Option<Vec<(String, candle_core::Tensor)>>) -> Result<MoeModel> {
    let router = scaled_router(model, 16, 5, 40.0)?.frozen(&model.config)?;
    let config = MoeConfig {
        format: crate::format::FORMAT.into(),
        base: crate::format::identity(file)?,
        split: split(model)?,
        router: Some(router.config),
        layerwise: false,
    };
    Ok(MoeModel { config, router: Some(router), gates: None, experts })
}

/// Layer-wise gates over 3 experts for `model`, seeded, with weights of order 1.
pub fn gates(model: &Model) -> Result<Gates> {
    let hidden = model.config.hidden_size;
    let weights = (0..model.layers.len())
        .map(|l| {
            let v: Vec<f32> = (0..3 * hidden).map(|i| (((i * 17 + l * 3) % 11) as f32 - 5.0) / 5.0).collect();
            Ok(candle_core::Tensor::from_vec(v, (3, hidden), &candle_core::Device::Cpu)?)
        })
        .collect::<Result<_>>()?;
    Ok(Gates { experts: 3, weights })
}
