//! Shared by the MoE tests: tiny models, a seeded split, and a router whose picks vary.
#![allow(dead_code)]

use candle_core::DType;
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::pregate::PreGate;
use recompose_llm::{LoadOptions, Model, WeightMode};
use recompose_moe::{router, ChannelStats, ExpertSplit, MoeConfig, MoeModel};

/// A tiny model of `arch` with Q8_0 weights (written into `dir` once), loaded as `mode` asks:
/// the same file runs packed or dequantised.
pub fn tiny(
    dir: &std::path::Path,
    arch: &'static str,
    seed: u64,
    dtype: DType,
    mode: WeightMode,
) -> (ModelFile, Model) {
    let q = candle_core::quantized::GgmlDType::Q8_0;
    let p = dir.join(format!("{arch}-{seed}.gguf"));
    if !p.exists() {
        write_tiny_gguf(&p, &TinySpec { arch, seed, dtype: q, ..Default::default() }).unwrap();
    }
    let f = ModelFile::open(&p).unwrap();
    let m = Model::load_with(&f, LoadOptions { mode, dtype, ..Default::default() }).unwrap();
    (f, m)
}

/// A split of `model` into 3 experts from seeded pseudo-random statistics.
pub fn split(model: &Model) -> ExpertSplit {
    let channels = model.layers[0].ffn.as_dense().unwrap().gate.dims().0;
    let stats: Vec<ChannelStats> = (0..3)
        .map(|d| ChannelStats {
            name: format!("d{d}"),
            sums: (0..model.layers.len())
                .map(|l| (0..channels).map(|c| ((c * 31 + l * 7 + d * 57) % 97) as f64).collect())
                .collect(),
            tokens: 1000,
        })
        .collect();
    ExpertSplit::from_domains(&stats, 0.5).unwrap()
}

/// A frozen router over 3 experts with weights large enough that its picks vary by token.
pub fn router(model: &Model) -> PreGate {
    let g = router::init(model, 3, 16, 5).unwrap();
    for (_, v) in g.vars() {
        if v.as_tensor().rank() == 2 {
            v.set(&(v.as_tensor() * 40.0).unwrap()).unwrap();
        }
    }
    g.frozen(&model.config).unwrap()
}

/// The MoE of [`split`] and [`router`] for `model` (made from `file`), experts from the base.
pub fn moe(file: &ModelFile, model: &Model, experts: Option<Vec<(String, candle_core::Tensor)>>) -> MoeModel {
    let router = router(model);
    let base = recompose_moe::format::identity(file).unwrap();
    let config = MoeConfig {
        format: recompose_moe::format::FORMAT.into(),
        base,
        split: split(model),
        router: Some(router.config),
    };
    MoeModel { config, router: Some(router), experts }
}
