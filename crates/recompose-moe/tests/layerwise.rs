//! The layer-wise routing baseline: gates that learn a linear rule, gates that route as their
//! argmax says, and the FFN inputs they are trained on.

use candle_core::{DType, Device, Tensor};
use recompose_llm::ffn::{Ffn, FfnContext};
use recompose_llm::WeightMode;
use recompose_moe::layerwise::{self, Gates};

mod common;
use common::tiny;

#[test]
fn gates_learn_which_expert_a_linear_rule_picks() {
    // Two layers, 8-dim inputs; layer l's target is the argmax of a fixed map of the input.
    let dev = Device::Cpu;
    let n = 400;
    let x: Vec<f32> = (0..n * 8).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) + 0.3 * (i as f32 * 0.7).sin()).collect();
    let x = Tensor::from_vec(x, (n, 8), &dev).unwrap();
    let rule = |l: usize| -> Vec<u32> {
        let m: Vec<f32> = (0..3 * 8).map(|i| (((i + 5 * l) * 13 % 7) as f32 - 3.0) / 3.0).collect();
        let m = Tensor::from_vec(m, (3, 8), &dev).unwrap();
        x.matmul(&m.t().unwrap()).unwrap().argmax(1).unwrap().to_vec1().unwrap()
    };
    let targets = vec![rule(0), rule(1)];
    let xs = vec![x.clone(), x.clone()];
    let (gates, losses) = layerwise::train(&xs, &targets, 3, 400, 64, 3e-2, 1).unwrap();
    for l in 0..2 {
        let got = gates.route(l, &x).unwrap();
        let acc = got.iter().zip(&targets[l]).filter(|(a, b)| a == b).count() as f64 / n as f64;
        assert!(acc > 0.95, "layer {l}: accuracy {acc} (loss {:.3} -> {:.3})", losses[0], losses[losses.len() - 1]);
    }
    assert!(layerwise::train(&xs, &targets[..1], 3, 1, 8, 1e-2, 0).is_err());
    assert!(layerwise::train(&xs, &[vec![0; n], vec![3; n]], 3, 1, 8, 1e-2, 0).is_err());
}

#[test]
fn a_gated_layer_is_its_moe_routed_by_the_gates_argmax() {
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 1, DType::F32, WeightMode::F32);
    let split = common::split(&model);
    let rows: Vec<Vec<u32>> = vec![(0..13).map(|i| 5 + 7 * i).collect(), (0..6).map(|i| 40 + i).collect()];
    // The inputs are the dense model's FFN inputs: every token, then every third.
    let xs = layerwise::inputs(&mut model, &rows, 1).unwrap();
    assert_eq!(xs.len(), model.layers.len());
    assert_eq!(xs[0].dims(), &[19, model.config.hidden_size]);
    let every3 = layerwise::inputs(&mut model, &rows, 3).unwrap();
    assert_eq!(every3[1].dims()[0], 5 + 2);
    // Every third token of each row (13 and 6 tokens: 0, 3, .., 12 and 13 + 0, 13 + 3).
    let picked: Vec<u32> = vec![0, 3, 6, 9, 12, 13, 16];
    let want = xs[1].index_select(&Tensor::new(picked.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) =
        (every3[1].flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
    assert_eq!(a, b, "the sampled inputs are every third of all of them");
    let gates = recompose_moe::testing::gates(&model).unwrap();
    let ffns = layerwise::gated(&model, &split, &gates).unwrap();
    assert_eq!(ffns[1].routing_seconds(), 0.0);
    let moes = recompose_moe::ffn::cut(&model, &split).unwrap();
    let x = &xs[1];
    let routes = gates.route(1, x).unwrap();
    assert!(routes.iter().any(|&e| e != routes[0]), "{routes:?}");
    let n = routes.len();
    let lens = [n];
    let ctx = |route| FfnContext {
        layer: 1,
        batch: 1,
        t: n,
        start: &[0],
        lens: &lens,
        route,
        width: None,
        dropout_seed: None,
    };
    let got = ffns[1].forward(x, &ctx(None)).unwrap();
    let want = moes[1].forward(x, &ctx(Some(&routes))).unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) =
        (got.y.flatten_all().unwrap().to_vec1().unwrap(), want.y.flatten_all().unwrap().to_vec1().unwrap());
    assert_eq!(a, b);
    assert_eq!(got.usage, want.usage);
    assert!(ffns[1].routing_seconds() > 0.0, "the gate's time is counted");
    assert_eq!(ffns[0].routing_seconds(), 0.0, "each layer counts its own");
    let short = Gates { experts: 3, weights: gates.weights[..1].to_vec() };
    assert!(layerwise::gated(&model, &split, &short).is_err());
}
