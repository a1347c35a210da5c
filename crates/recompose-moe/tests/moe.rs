//! The MoE FFN against a masked dense FFN (the oracle), a split that keeps every channel against
//! the dense model, and statistics that leave the model as it was.

use candle_core::{Device, Tensor};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::ffn::{DenseFfn, Ffn, FfnContext};
use recompose_llm::linear::Weight;
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model, Plan, WeightMode};
use recompose_moe::{stats, ChannelStats, ExpertSplit, MoeFfn};

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

/// A split of `layers x channels` from seeded pseudo-random statistics of `domains` domains.
fn random_split(layers: usize, channels: usize, domains: usize, keep: f64) -> ExpertSplit {
    let stats: Vec<ChannelStats> = (0..domains)
        .map(|d| ChannelStats {
            name: format!("d{d}"),
            sums: (0..layers)
                .map(|l| (0..channels).map(|c| ((c * 31 + l * 7 + d * 57) % 97) as f64).collect())
                .collect(),
            tokens: 1000,
        })
        .collect();
    ExpertSplit::from_domains(&stats, keep).unwrap()
}

/// The weight of a linear as f32 `(rows, cols)`, dequantised if packed.
fn dense_weight(l: &recompose_llm::linear::Linear) -> Tensor {
    match &l.weight {
        Weight::Dense(w) => w.to_dtype(candle_core::DType::F32).unwrap(),
        Weight::Packed(p) => {
            let mut out = vec![0f32; p.rows() * p.cols()];
            for (r, row) in out.chunks_exact_mut(p.cols()).enumerate() {
                p.dequantize_row(r, row);
            }
            Tensor::from_vec(out, (p.rows(), p.cols()), &Device::Cpu).unwrap()
        }
    }
}

/// The oracle: the dense FFN in plain f32 with the channels outside each row's permanent set and
/// expert zeroed before the down projection.
fn masked_dense(dense: &DenseFfn, split: &ExpertSplit, layer: usize, x: &Tensor, route: &[u32]) -> Tensor {
    let (g, u, d) = (dense_weight(&dense.gate), dense_weight(&dense.up), dense_weight(&dense.down));
    let gx = x.matmul(&g.t().unwrap()).unwrap();
    let ux = x.matmul(&u.t().unwrap()).unwrap();
    let a = recompose_llm::grad::gated_composed(&gx, &ux, dense.activation).unwrap();
    let c = split.channels;
    let mut mask = vec![0f32; route.len() * c];
    for (i, &e) in route.iter().enumerate() {
        for &ch in split.permanent[layer].iter().chain(&split.experts[layer][e as usize]) {
            mask[i * c + ch as usize] = 1.0;
        }
    }
    let mask = Tensor::from_vec(mask, (route.len(), c), &Device::Cpu).unwrap();
    (a * mask).unwrap().matmul(&d.t().unwrap()).unwrap()
}

fn check_against_masked_dense(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let dense = model.layers[1].ffn.as_dense().unwrap();
    let (channels, hidden) = dense.gate.dims();
    let packed = matches!(dense.gate.weight, Weight::Packed(_));
    assert_eq!(packed, mode == WeightMode::Quantized, "the quantised case must take the packed kernels");
    let split = random_split(model.layers.len(), channels, 3, 0.5);
    let moe = MoeFfn::from_dense(dense, &split, 1).unwrap();
    let n = 9;
    let x: Vec<f32> = (0..n * hidden).map(|i| ((i * 29 % 23) as f32 / 11.0 - 1.0) + 0.2 * (i as f32).cos()).collect();
    let x = Tensor::from_vec(x, (n, hidden), &Device::Cpu).unwrap();
    // Mixed routes with expert 1 idle (an idle expert must not disturb the others), and every
    // token to one expert (the path without gathering rows).
    let mixed: Vec<u32> = (0..n as u32).map(|i| if i % 2 == 0 { 0 } else { 2 }).collect();
    for (route, usage) in [(mixed, vec![5, 0, 4]), (vec![1; n], vec![0, 9, 0])] {
        let lens = [n];
        let ctx = FfnContext {
            layer: 1,
            batch: 1,
            t: n,
            start: &[0],
            lens: &lens,
            route: Some(&route),
            width: None,
            dropout_seed: None,
        };
        let out = moe.forward(&x, &ctx).unwrap();
        let want = masked_dense(dense, &split, 1, &x, &route);
        let gap =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = gap(&out.y, &want);
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Packed experts run the int8 kernels (activations rounded to 8 bits, down requantised
        // to Q8_0): a rounding error, far below what a wrong mask changes (checked below).
        let tol = if mode == WeightMode::Quantized { 2e-2 } else { 1e-5 } * scale.max(1.0);
        assert!(diff <= tol, "{arch} {mode:?} {route:?}: off the masked dense FFN by {diff} (scale {scale})");
        let wrong: Vec<u32> = route.iter().map(|&e| (e + 1) % 3).collect();
        let far = gap(&masked_dense(dense, &split, 1, &x, &wrong), &want);
        assert!(far > 10.0 * tol, "{arch} {mode:?}: other routes change the output by only {far}");
        assert_eq!(out.usage, Some(usage));
    }
}

#[test]
fn moe_ffn_equals_a_masked_dense_ffn_f32() {
    check_against_masked_dense("llama", WeightMode::F32);
}

#[test]
fn moe_ffn_equals_a_masked_dense_ffn_quantized_and_gelu() {
    check_against_masked_dense("gemma3", WeightMode::Quantized);
}

#[test]
fn moe_ffn_refuses_missing_or_foreign_routes() {
    let (_d, model) = load("llama", WeightMode::F32);
    let dense = model.layers[0].ffn.as_dense().unwrap();
    let (channels, hidden) = dense.gate.dims();
    let split = random_split(model.layers.len(), channels, 2, 0.5);
    let moe = MoeFfn::from_dense(dense, &split, 0).unwrap();
    let x = Tensor::zeros((2, hidden), candle_core::DType::F32, &Device::Cpu).unwrap();
    let lens = [2];
    let ctx = |route| FfnContext {
        layer: 0,
        batch: 1,
        t: 2,
        start: &[0],
        lens: &lens,
        route,
        width: None,
        dropout_seed: None,
    };
    let e = moe.forward(&x, &ctx(None)).err().unwrap().to_string();
    assert!(e.contains("needs each token's expert"), "{e}");
    let e = moe.forward(&x, &ctx(Some(&[0, 7]))).err().unwrap().to_string();
    assert!(e.contains("expert 7 of 2"), "{e}");
    let e = moe.forward(&x, &ctx(Some(&[0]))).err().unwrap().to_string();
    assert!(e.contains("1 routes for 2 tokens"), "{e}");
    let e = MoeFfn::from_dense(dense, &random_split(1, channels + 1, 2, 0.5), 0).err().unwrap().to_string();
    assert!(e.contains("is not in a split"), "{e}");
}

fn logits(model: &Model, row: &[u32], plan: &Plan) -> Vec<f32> {
    let mut cache = model.new_cache(1);
    let (t, step) = step_for(&[row.to_vec()], &cache, 0);
    let out = model.forward_with(&t, &step, &mut [&mut cache], Logits::All, plan).unwrap();
    out.logits.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_split_that_keeps_every_channel_gives_the_dense_model() {
    let (_d, mut model) = load("llama", WeightMode::F32);
    let row: Vec<u32> = (0..12).map(|i| 5 + i * 3).collect();
    let dense = logits(&model, &row, &Plan::default());
    let channels = model.layers[0].ffn.as_dense().unwrap().gate.dims().0;
    let split = random_split(model.layers.len(), channels, 2, 1.0);
    assert!(split.experts.iter().flatten().all(Vec::is_empty));
    for l in 0..model.layers.len() {
        let moe = MoeFfn::from_dense(model.layers[l].ffn.as_dense().unwrap(), &split, l).unwrap();
        model.layers[l].ffn = Box::new(moe);
    }
    // One route list for every layer: the pre-gating router's.
    let plan = Plan { routes: Some(vec![vec![1; row.len()]]), ..Default::default() };
    let moe = logits(&model, &row, &plan);
    let d = dense.iter().zip(&moe).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "a split keeping every channel is off the dense model by {d}");
}

#[test]
fn statistics_leave_the_model_as_it_was_and_add_up_over_rows() {
    let (_d, mut model) = load("llama", WeightMode::Quantized);
    let a: Vec<u32> = (0..20).map(|i| 3 + i).collect();
    let b: Vec<u32> = (0..13).map(|i| 100 + 2 * i).collect();
    let before = logits(&model, &a, &Plan::default());
    let mut seen = vec![];
    let both =
        stats::collect(&mut model, "ab", &[a.clone(), b.clone()], |done, total| seen.push((done, total))).unwrap();
    assert_eq!(seen, vec![(1, 2), (2, 2)]);
    assert_eq!(logits(&model, &a, &Plan::default()), before, "the FFNs were not put back as they were");
    let sa = stats::collect(&mut model, "a", std::slice::from_ref(&a), |_, _| {}).unwrap();
    let sb = stats::collect(&mut model, "b", std::slice::from_ref(&b), |_, _| {}).unwrap();
    assert_eq!(both.tokens, 33);
    assert_eq!(
        (both.layers(), both.channels()),
        (model.layers.len(), model.layers[0].ffn.as_dense().unwrap().gate.dims().0)
    );
    for l in 0..both.layers() {
        for c in 0..both.channels() {
            let (x, y) = (both.sums[l][c], sa.sums[l][c] + sb.sums[l][c]);
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "layer {l} channel {c}: {x} vs {y}");
        }
    }
    assert!(both.sums.iter().flatten().all(|&s| s > 0.0), "every channel of a real FFN fires a little");
    let e = stats::collect(&mut model, "none", &[], |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("no calibration tokens"), "{e}");
}

#[test]
fn oracle_overlaps_of_experts_partitioning_the_channels_sum_to_the_active_count() {
    // No permanent channels, experts = channels mod 3: every one of a token's k active channels
    // of every layer lands in exactly one expert.
    let (_d, mut model) = load("llama", WeightMode::Quantized);
    let layers = model.layers.len();
    let channels = model.layers[0].ffn.as_dense().unwrap().gate.dims().0;
    let split = ExpertSplit {
        names: vec!["a".into(), "b".into(), "c".into()],
        channels,
        keep: 0.25,
        permanent: vec![vec![]; layers],
        experts: vec![(0..3).map(|e| (0..channels as u32).filter(|c| c % 3 == e).collect()).collect(); layers],
    };
    let rows: Vec<Vec<u32>> = vec![(0..9).map(|i| 7 + 5 * i).collect(), (0..4).map(|i| 50 + i).collect()];
    let o = recompose_moe::oracle::overlaps(&mut model, &split, &rows, |_, _| {}).unwrap();
    let k = (channels as f64 * 0.25).round() as u32;
    assert_eq!(o.iter().map(Vec::len).collect::<Vec<_>>(), vec![9, 4]);
    for (r, row) in o.iter().enumerate() {
        for (t, s) in row.iter().enumerate() {
            assert_eq!(s.iter().sum::<u32>(), k * layers as u32, "row {r} token {t}: {s:?}");
        }
    }
    // A split for another model is refused.
    let mut other = split.clone();
    other.channels += 1;
    assert!(recompose_moe::oracle::overlaps(&mut model, &other, &rows, |_, _| {}).is_err());
}

#[test]
fn oracle_overlaps_equal_a_full_sort_of_each_tokens_activations() {
    let (_d, mut model) = load("gemma3", WeightMode::Quantized);
    let layers = model.layers.len();
    let channels = model.layers[0].ffn.as_dense().unwrap().gate.dims().0;
    let split = random_split(layers, channels, 3, 0.5);
    let rows: Vec<Vec<u32>> = vec![(0..11).map(|i| 9 + 3 * i).collect()];
    let got = recompose_moe::oracle::overlaps(&mut model, &split, &rows, |_, _| {}).unwrap();
    // The reference: every token's |a| per layer through the observer, sorted in full.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![vec![vec![0u32; 3]; 11]]));
    let s = seen.clone();
    let sp = split.clone();
    let sink: std::sync::Arc<stats::Sink> = std::sync::Arc::new(move |row, layer, _x: &Tensor, a: &[Vec<f32>]| {
        let k = (sp.channels as f64 * sp.keep).round() as usize;
        let mut s = s.lock().unwrap();
        for (t, act) in a.iter().enumerate() {
            let mut order: Vec<usize> = (0..act.len()).collect();
            order.sort_by(|&x, &y| act[y].total_cmp(&act[x]).then(x.cmp(&y)));
            for &c in &order[..k] {
                for e in 0..3 {
                    if sp.experts[layer][e].contains(&(c as u32)) {
                        s[row][t][e] += 1;
                    }
                }
            }
        }
    });
    stats::observe(&mut model, &rows, sink, |_, _| {}).unwrap();
    assert_eq!(got, *seen.lock().unwrap());
}
