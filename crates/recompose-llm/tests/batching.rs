//! Batched prefill and decode over rows of different lengths must give each row the logits it
//! gets alone (padding masked, positions per row), for GQA Llama and for Gemma 3's sliding window.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::model::step_for;
use recompose_llm::sample::argmax;
use recompose_llm::{Logits, Model, WeightMode};

fn load(arch: &'static str, mode: WeightMode) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    let dtype = if mode == WeightMode::Quantized {
        candle_core::quantized::GgmlDType::Q8_0
    } else {
        candle_core::quantized::GgmlDType::F32
    };
    write_tiny_gguf(&p, &TinySpec { arch, dtype, ..Default::default() }).unwrap();
    let m = Model::load(&ModelFile::open(&p).unwrap(), mode).unwrap();
    (d, m)
}

/// Greedy-decodes `steps` tokens for each row; returns the logits of every step per row.
fn run(model: &Model, rows: &[Vec<u32>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut cache = model.new_cache(rows.len());
    let (t, s) = step_for(rows, &cache, 0);
    let mut logits: Vec<Vec<f32>> = model.forward(&t, &s, &mut cache, Logits::Last).unwrap().to_vec2().unwrap();
    let mut out: Vec<Vec<Vec<f32>>> = logits.iter().map(|l| vec![l.clone()]).collect();
    for _ in 0..steps {
        let next: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
        let (t, s) = step_for(&next, &cache, 0);
        logits = model.forward(&t, &s, &mut cache, Logits::Last).unwrap().to_vec2().unwrap();
        for (o, l) in out.iter_mut().zip(&logits) {
            o.push(l.clone());
        }
    }
    out
}

fn check(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let rows: Vec<Vec<u32>> = vec![
        (0..3).map(|i| 40 + i).collect(),
        (0..13).map(|i| 60 + 3 * i).collect(),
        (0..7).map(|i| 100 + i).collect(),
    ];
    let batched = run(&model, &rows, 6);
    for (b, row) in rows.iter().enumerate() {
        let alone = run(&model, std::slice::from_ref(row), 6);
        let d =
            batched[b].iter().flatten().zip(alone[0].iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "{arch} {mode:?}: row {b} differs by {d} when batched");
    }
}

#[test]
fn batched_rows_match_single_rows_llama_gqa() {
    check("llama", WeightMode::F32);
}

#[test]
fn batched_rows_match_single_rows_gemma3_sliding_window() {
    check("gemma3", WeightMode::F32);
}

#[test]
fn batched_rows_match_single_rows_quantized() {
    check("llama", WeightMode::Quantized);
}

#[test]
fn chunked_prefill_equals_one_shot() {
    // Feeding a prompt in pieces through the cache gives the same last logits as all at once.
    let (_d, model) = load("gemma3", WeightMode::F32);
    let ids: Vec<u32> = (0..20).map(|i| 33 + 5 * i).collect();
    let mut c1 = model.new_cache(1);
    let (t, s) = step_for(&[ids.clone()], &c1, 0);
    let one: Vec<f32> = model.forward(&t, &s, &mut c1, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut c2 = model.new_cache(1);
    let mut last: Vec<f32> = vec![];
    for chunk in ids.chunks(6) {
        let (t, s) = step_for(&[chunk.to_vec()], &c2, 0);
        last = model.forward(&t, &s, &mut c2, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    }
    let d = one.iter().zip(&last).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "chunked prefill differs by {d}");
}
