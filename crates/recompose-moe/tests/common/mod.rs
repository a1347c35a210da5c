//! Shared by the MoE tests: tiny models, a seeded split, and a router whose picks vary.
#![allow(dead_code)]

use candle_core::DType;
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::pregate::PreGate;
use recompose_llm::{LoadOptions, Model, WeightMode};
use recompose_moe::{ExpertSplit, MoeModel};

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
    recompose_moe::testing::split(model).unwrap()
}

/// A frozen router over 3 experts with weights large enough that its picks vary by token.
pub fn router(model: &Model) -> PreGate {
    recompose_moe::testing::scaled_router(model, 16, 5, 40.0).unwrap().frozen(&model.config).unwrap()
}

/// The MoE of [`split`] and [`router`] for `model` (made from `file`), experts from the base.
pub fn moe(file: &ModelFile, model: &Model, experts: Option<Vec<(String, candle_core::Tensor)>>) -> MoeModel {
    recompose_moe::testing::moe(file, model, experts).unwrap()
}

/// Checks the gradient `grads` holds for each of `vars` against central finite differences of
/// `loss` at three elements (`at(len)`), within a relative error of 1e-5 (`floor`: the smallest
/// derivative the error is relative to).
pub fn check_finite_differences(
    vars: &[&(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    loss: impl Fn() -> f64,
    at: impl Fn(usize) -> [usize; 3],
    floor: f64,
) {
    let h = 1e-5;
    for (name, v) in vars {
        let g: Vec<f64> =
            grads.get(v.as_tensor()).expect("every parameter takes part").flatten_all().unwrap().to_vec1().unwrap();
        let w0 = v.as_tensor().copy().unwrap();
        let flat: Vec<f64> = w0.flatten_all().unwrap().to_vec1().unwrap();
        for j in at(flat.len()) {
            let shifted = |dx: f64| {
                let mut x = flat.clone();
                x[j] += dx;
                v.set(&candle_core::Tensor::from_vec(x, w0.shape(), &candle_core::Device::Cpu).unwrap()).unwrap();
                loss()
            };
            let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
            v.set(&w0).unwrap();
            let e = (fd - g[j]).abs() / fd.abs().max(floor);
            assert!(e < 1e-5, "{name} [{j}]: autograd {} vs finite differences {fd}", g[j]);
        }
    }
}
