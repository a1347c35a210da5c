//! Format conversion keeps the model: GGUF -> HF safetensors -> GGUF gives the same logits on the
//! f32 path (Q/K permutation and Gemma's norm offset undone and redone), for Llama and Gemma 3.

use recompose_core::convert::{convert, OutDType};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model, WeightMode};
use std::path::Path;

fn logits(path: &Path, mode: WeightMode) -> Vec<Vec<f32>> {
    let f = ModelFile::open(path).unwrap();
    let m = Model::load(&f, mode).unwrap();
    let ids: Vec<u32> = vec![256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65];
    let mut cache = m.new_cache(1);
    let (t, s) = step_for(&[ids], &cache, 0);
    m.forward(&t, &s, &mut cache, Logits::All).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn round_trip(arch: &'static str) {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("tiny.gguf");
    write_tiny_gguf(&src, &TinySpec { arch, ..Default::default() }).unwrap();
    let hf = d.path().join("hf");
    let back = d.path().join("back.gguf");
    convert(&src, &hf, None, &mut |_, _| {}).unwrap();
    convert(&hf, &back, Some(OutDType::F32), &mut |_, _| {}).unwrap();
    let reference = logits(&src, WeightMode::F32);
    let via_hf = logits(&hf, WeightMode::F32);
    let via_back = logits(&back, WeightMode::F32);
    assert!(max_diff(&reference, &via_hf) < 1e-4, "{arch}: HF copy differs by {}", max_diff(&reference, &via_hf));
    assert!(max_diff(&reference, &via_back) < 1e-4, "{arch}: GGUF copy differs by {}", max_diff(&reference, &via_back));
    // An 8-bit copy stays close, and the quantised path runs on it.
    let q8 = d.path().join("q8.gguf");
    convert(&hf, &q8, Some(OutDType::Q8_0), &mut |_, _| {}).unwrap();
    let via_q8 = logits(&q8, WeightMode::Quantized);
    let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&reference, &via_q8);
    assert!(d < 0.02 * scale, "{arch}: q8_0 copy differs by {d} (logits up to {scale})");
}

#[test]
fn llama_round_trips_through_safetensors() {
    round_trip("llama");
}

#[test]
fn gemma3_round_trips_through_safetensors() {
    round_trip("gemma3");
}
