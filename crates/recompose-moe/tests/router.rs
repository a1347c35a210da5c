//! The pre-gating router: its gradient against finite differences (f64), and training that
//! learns a rule which needs the causal context (every token's expert is set by the row's first
//! token).

use candle_core::{DType, Device, Tensor};
use recompose_moe::router::{train, Router, RouterConfig, TrainOptions};

fn config(hidden: usize, experts: usize) -> RouterConfig {
    RouterConfig { hidden, heads: 2, ffn: 12, experts }
}

#[test]
fn router_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let r = Router::init(config(8, 3), 7, DType::F64, &dev).unwrap();
    // Larger weights than the init's 0.02, so every part of the block matters to the loss.
    for p in r.params() {
        let t = p.var.as_tensor();
        if t.rank() == 2 {
            p.var.set(&(t * 20.0).unwrap()).unwrap();
        }
    }
    let x: Vec<f64> = (0..80).map(|i| ((i * 13 % 17) as f64 / 8.0 - 1.0) + 0.1 * (i as f64).sin()).collect();
    let x = Tensor::from_vec(x, (2, 5, 8), &dev).unwrap();
    let targets: Vec<u32> = (0..10).map(|i| (i * 7 % 3) as u32).collect();
    let loss = r.loss(&x, &targets).unwrap();
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    for p in r.params() {
        let g = grads.get(p.var.as_tensor()).expect("every parameter takes part").flatten_all().unwrap();
        let g: Vec<f64> = g.to_vec1().unwrap();
        let w0 = p.var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = w0.flatten_all().unwrap().to_vec1().unwrap();
        for j in [0, flat.len() / 2, flat.len() - 1] {
            let at = |d: f64| {
                let mut v = flat.clone();
                v[j] += d;
                p.var.set(&Tensor::from_vec(v, w0.shape(), &dev).unwrap()).unwrap();
                r.loss(&x, &targets).unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            p.var.set(&w0).unwrap();
            let e = (fd - g[j]).abs() / fd.abs().max(1e-3);
            assert!(e < 1e-5, "{} [{j}]: autograd {} vs finite differences {fd}", p.name, g[j]);
        }
    }
}

#[test]
fn router_learns_experts_set_by_the_causal_context() {
    // 6 token kinds with random embeddings; a row's expert is its first token's kind mod 3, for
    // every token of the row: only attention to the first token can tell.
    let dev = Device::Cpu;
    let (d, t, kinds) = (16, 6, 6);
    // Distinct embeddings per kind (one-hot plus a fixed spread), so the test is deterministic.
    let table: Vec<f32> =
        (0..kinds * d).map(|i| if i % d == i / d { 2.0 } else { 0.3 * ((i * 37) as f32).sin() }).collect();
    let table = Tensor::from_vec(table, (kinds, d), &dev).unwrap();
    let mut xs = vec![];
    let mut targets = vec![];
    for row in 0..48u32 {
        let ids: Vec<u32> = (0..t as u32).map(|i| (row * 5 + i * 7 + row / 6) % kinds as u32).collect();
        xs.push(table.index_select(&Tensor::new(ids.as_slice(), &dev).unwrap(), 0).unwrap());
        targets.push(vec![ids[0] % 3; t]);
    }
    let mut r = Router::init(RouterConfig { hidden: d, heads: 2, ffn: 32, experts: 3 }, 1, DType::F32, &dev).unwrap();
    let opts = TrainOptions { steps: 300, lr: 1e-2, batch: 8, seed: 3 };
    let losses = train(&mut r, &xs, &targets, opts, |_, _| {}).unwrap();
    let right: usize = xs
        .iter()
        .zip(&targets)
        .map(|(x, tg)| r.route(&x.unsqueeze(0).unwrap()).unwrap().iter().zip(tg).filter(|(a, b)| a == b).count())
        .sum();
    let acc = right as f64 / (48 * t) as f64;
    assert!(acc > 0.95, "accuracy {acc} after training (loss {:.3} -> {:.3})", losses[0], losses[losses.len() - 1]);
}

#[test]
fn bad_router_settings_are_refused() {
    let dev = Device::Cpu;
    let e = Router::init(RouterConfig { hidden: 10, heads: 3, ffn: 4, experts: 3 }, 0, DType::F32, &dev).err().unwrap();
    assert!(e.to_string().contains("must split into 3 heads"), "{e}");
    let e = Router::init(config(8, 1), 0, DType::F32, &dev).err().unwrap();
    assert!(e.to_string().contains("at least two"), "{e}");
    let mut r = Router::init(config(8, 2), 0, DType::F32, &dev).unwrap();
    let e = train(&mut r, &[], &[], TrainOptions { steps: 1, lr: 1e-3, batch: 1, seed: 0 }, |_, _| {}).err().unwrap();
    assert!(e.to_string().contains("0 rows"), "{e}");
}

#[test]
fn a_saved_router_reads_back_the_same_and_refuses_another_backbone() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("router.safetensors");
    let r = Router::init(config(8, 3), 11, DType::F32, &dev).unwrap();
    r.save(&path, "model-a").unwrap();
    let back = Router::load(&path, "model-a").unwrap();
    assert_eq!(back.config, r.config);
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8), &dev).unwrap();
    let (a, b) = (r.logits(&x).unwrap(), back.logits(&x).unwrap());
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let e = Router::load(&path, "model-b").err().unwrap().to_string();
    assert!(e.contains("a router for another model"), "{e}");
    // A file that is not a router, and a truncated one.
    let other = d.path().join("other.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&other, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Router::load(&other, "model-a").is_err());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2, "scratch left behind");
}
