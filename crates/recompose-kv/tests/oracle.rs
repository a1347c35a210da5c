//! Bounded policies against the mask oracle: the same logits (max |diff| 1e-4) on smollm2-135m
//! (9 query heads on 3 KV heads), gemma3-270m (4 on 1, sliding layers), tiny random models with
//! MHA (4 on 4), GQA (4 on 2) and a sliding window, at batch 1 and batch 4 with mixed lengths,
//! in both prefill modes.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_kv::oracle::MaskOracle;
use recompose_kv::{BoundedCache, KvSpec};
use recompose_llm::kv::KvCache;
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model, WeightMode};

fn tiny(arch: &'static str, kv_heads: usize) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    write_tiny_gguf(&p, &TinySpec { arch, seed: 7, kv_heads, ..Default::default() }).unwrap();
    let m = Model::load(&ModelFile::open(&p).unwrap(), WeightMode::F32).unwrap();
    (d, m)
}

fn real(asset: &str) -> Model {
    let path = recompose_assets::main_file(asset).unwrap();
    Model::load(&ModelFile::open(path).unwrap(), WeightMode::F32).unwrap()
}

/// Prefills `rows`, then feeds `decode` steps of one fixed token per row; returns every logit.
fn drive(model: &Model, cache: &mut dyn KvCache, rows: &[Vec<u32>], decode: usize) -> Vec<f32> {
    let mut out: Vec<f32> = model.prefill(rows, cache, 512).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for s in 0..decode {
        let next: Vec<Vec<u32>> = (0..rows.len()).map(|b| vec![((s * 7 + b * 13) % 200 + 3) as u32]).collect();
        let (t, st) = step_for(&next, cache, 0);
        let l = model.forward(&t, &st, cache, Logits::Last).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn rows_of(lens: &[usize], vocab: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(b, &n)| (0..n).map(|i| ((i * 31 + b * 17 + i * i) % (vocab - 3) + 2) as u32).collect())
        .collect()
}

/// Every spec on every row set: bounded == oracle, and the policy really changed the logits.
fn check(model: &Model, specs: &[&str], row_sets: &[Vec<usize>], decode: usize) {
    let layout = model.cache_layout();
    let vocab = model.config.vocab_size.min(2000);
    for lens in row_sets {
        let rows = rows_of(lens, vocab);
        let mut full = model.new_cache(rows.len());
        let reference = drive(model, &mut full, &rows, decode);
        for s in specs {
            let spec: KvSpec = s.parse().unwrap();
            let mut bounded = BoundedCache::from_spec(&layout, &spec, lens).unwrap();
            let mut oracle = MaskOracle::new(&layout, &spec, lens);
            let got = drive(model, &mut bounded, &rows, decode);
            let want = drive(model, &mut oracle, &rows, decode);
            let d = max_diff(&got, &want);
            eprintln!("{s} rows {lens:?}: max diff {d:.2e}");
            assert!(d <= 1e-4, "{s} rows {lens:?}: bounded vs oracle max |diff| {d}");
            assert!(max_diff(&got, &reference) > 1e-3, "{s} rows {lens:?}: no eviction changed the logits");
            for l in 0..layout.num_layers {
                for b in 0..rows.len() {
                    for h in 0..layout.kv_heads {
                        assert_eq!(bounded.held(l, b, h), oracle.held(l, b, h), "{s}: layer {l} row {b} head {h}");
                    }
                }
            }
        }
    }
}

const SPECS: &[&str] = &[
    "window:12,sinks=3",
    "window:12,sinks=3,pos=original",
    "window:10",
    "window:12,sinks=2,prefill=5",
    "h2o:12",
    "h2o:heavy=8,recent=4,agg=max",
    "h2o:heavy=6,recent=5,agg=sum,prefill=4",
    "h2o:0.5",
];

#[test]
fn tiny_mha_llama_matches_oracle_batch_1_and_4() {
    let (_d, m) = tiny("llama", 4);
    check(&m, SPECS, &[vec![30], vec![30, 9, 21, 2]], 20);
}

#[test]
fn tiny_gqa_llama_matches_oracle_batch_1_and_4() {
    let (_d, m) = tiny("llama", 2);
    check(&m, SPECS, &[vec![30], vec![30, 9, 21, 2]], 20);
}

#[test]
fn tiny_gemma3_with_sliding_window_matches_oracle() {
    let (_d, m) = tiny("gemma3", 2);
    // Budgets below the tiny model's window of 8, so eviction matters on its sliding layers.
    let specs =
        ["window:6,sinks=2", "window:6,sinks=2,pos=original", "h2o:6", "h2o:heavy=3,recent=2,agg=max,prefill=3"];
    check(&m, &specs, &[vec![26], vec![26, 11, 3, 18]], 20);
}

#[test]
fn smollm2_mha_matches_oracle() {
    let m = real("smollm2-135m");
    let specs = ["window:24,sinks=4", "h2o:24", "h2o:24,prefill=8", "window:20,pos=original"];
    check(&m, &specs, &[vec![40], vec![40, 17, 29, 6]], 12);
}

#[test]
fn gemma3_one_kv_head_matches_oracle() {
    let m = real("gemma3-270m");
    let specs = ["window:24,sinks=4", "h2o:24,agg=max", "h2o:0.5,prefill=8"];
    check(&m, &specs, &[vec![40], vec![40, 17, 29, 6]], 12);
}
