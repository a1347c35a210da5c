//! Properties of the vision stack on tiny seeded models: attacks stay in the threat model,
//! expert-grouped inference equals the masked computation, autograd matches finite differences,
//! checkpoints round-trip and training resumes.

use candle_core::{DType, Device, Tensor, Var};
use recompose_vision::attack::{perturb, Attack, Objective};
use recompose_vision::model::{Arch, Exec, Model, ModelConfig};
use recompose_vision::nn::{cross_entropy, Ctx, Track};
use recompose_vision::train::{self, Method, OptState, TrainConfig};
use recompose_vision::Dataset;

fn config(arch: Arch, experts: usize, channels: usize) -> ModelConfig {
    ModelConfig {
        arch,
        width: 4,
        experts,
        router_width: 3,
        in_channels: channels,
        image_size: 8,
        classes: 3,
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
    }
}

fn images(n: usize, c: usize, seed: u64, dtype: DType) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n * c * 64).map(|_| r.random::<f64>()).collect();
    Tensor::from_vec(v, (n, c, 8, 8), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn labels(n: usize) -> Tensor {
    Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, &Device::Cpu).unwrap()
}

fn max_abs(t: Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Class k has mean brightness 0.35 + 0.15 k plus uniform noise: learnable, and a 0.1 attack
/// can cross the gap between classes.
fn tiny_dataset(n: usize, seed: u64) -> Dataset {
    let x: Vec<f32> = images(n, 3, seed, DType::F32).flatten_all().unwrap().to_vec1().unwrap();
    let images = x.iter().enumerate().map(|(i, v)| 0.35 + 0.15 * ((i / 192) % 3) as f32 + 0.2 * (v - 0.5)).collect();
    Dataset {
        name: "tiny".into(),
        channels: 3,
        height: 8,
        width: 8,
        images,
        labels: (0..n).map(|i| (i % 3) as u8).collect(),
        classes: vec!["a".into(), "b".into(), "c".into()],
    }
}

#[test]
fn pgd_and_fgsm_never_leave_the_epsilon_ball_or_the_pixel_range() {
    for arch in [Arch::Vgg, Arch::Resnet] {
        let m = Model::new(config(arch, 2, 3), 1, DType::F32).unwrap();
        // Pixels at 0 and 1 test the clamp to the valid range, not only the ball.
        let x = images(6, 3, 2, DType::F32).affine(1.4, -0.2).unwrap().clamp(0f32, 1f32).unwrap();
        let y = labels(6);
        for (a, obj) in [
            (Attack::pgd(8.0 / 255.0, 2.0 / 255.0, 7), Objective::CrossEntropy),
            (Attack::pgd(0.1, 0.06, 3), Objective::Kl),
            (Attack::fgsm(0.3), Objective::CrossEntropy),
        ] {
            let adv = perturb(&m, &x, &y, &a, obj, 3).unwrap();
            assert!(max_abs((&adv - &x).unwrap()) <= a.eps + 1e-6, "{arch:?} {a:?} left the ball");
            let lo = adv.flatten_all().unwrap().min(0).unwrap().to_scalar::<f32>().unwrap();
            let hi = adv.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(lo >= 0.0 && hi <= 1.0, "{arch:?} {a:?} left [0, 1]: {lo} {hi}");
            // The attack must move something (a test that could not fail otherwise).
            assert!(max_abs((&adv - &x).unwrap()) > 0.0);
        }
    }
}

#[test]
fn pgd_lowers_accuracy_of_a_trained_model() {
    let ds = tiny_dataset(48, 5);
    let m = Model::new(config(Arch::Vgg, 1, 3), 2, DType::F32).unwrap();
    let cfg = TrainConfig {
        method: Method::Standard,
        epochs: 15,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        beta: 6.0,
        train_attack: Attack::pgd(0.03, 0.02, 1),
        eval_attack: Attack::pgd(0.03, 0.01, 1),
        seed: 0,
        limit: None,
        balance: 0.0,
    };
    let mut st = OptState::new(&m, &cfg).unwrap();
    train::train(&m, &mut st, &ds, &ds, &cfg, &mut Quiet).unwrap();
    let clean = train::evaluate(&m, &ds, None, 16, |_| {}).unwrap().clean_acc;
    let robust = train::evaluate(&m, &ds, Some(&Attack::pgd(0.1, 0.025, 10)), 16, |_| {}).unwrap().robust_acc.unwrap();
    assert!(clean > 0.6, "the tiny model should fit its 48 images: {clean}");
    assert!(robust < clean, "PGD-10 at 0.1 should hurt: clean {clean} robust {robust}");
}

#[test]
fn expert_grouped_inference_equals_the_masked_computation() {
    for arch in [Arch::Vgg, Arch::Resnet] {
        let m = Model::new(config(arch, 2, 3), 7, DType::F64).unwrap();
        // Give BN non-trivial running statistics first, as after training.
        let x = images(16, 3, 8, DType::F64);
        m.forward(&x, &Ctx { train: true, track: Track::None }, Exec::Masked).unwrap();
        let masked = m.forward(&x, &Ctx::eval(), Exec::Masked).unwrap();
        let grouped = m.forward(&x, &Ctx::eval(), Exec::Grouped).unwrap();
        let d = max_abs((&masked.logits - &grouped.logits).unwrap());
        assert!(d < 1e-12, "{arch:?}: grouped differs from masked by {d}");
        // Both experts must be used, or the test says nothing about the grouping.
        for r in &masked.routes {
            let choice: Vec<u32> = r.argmax(1).unwrap().to_vec1().unwrap();
            assert!(choice.contains(&0) || choice.contains(&1));
        }
        let used: usize = masked
            .routes
            .iter()
            .map(|r| {
                let c: Vec<u32> = r.argmax(1).unwrap().to_vec1().unwrap();
                usize::from(c.contains(&0) && c.contains(&1))
            })
            .sum();
        assert!(used > 0, "{arch:?}: no MoE unit split the batch");
        assert!(m.forward(&x, &Ctx { train: true, track: Track::None }, Exec::Grouped).is_err());
    }
}

#[test]
fn moe_models_count_fewer_multiply_adds_than_dense() {
    for arch in [Arch::Vgg, Arch::Resnet] {
        let dense = Model::new(config(arch, 1, 3), 0, DType::F32).unwrap().macs();
        let moe = Model::new(config(arch, 2, 3), 0, DType::F32).unwrap().macs();
        assert!(moe < dense && moe * 10 > dense * 4, "{arch:?}: dense {dense} moe {moe}");
    }
}

/// Central differences in f64 against autograd for the loss of a tiny MoE CNN in training mode
/// (batch-statistics BN), for the input and every non-router parameter. Router parameters are
/// excluded by design: the hard top-1 forward has zero derivative there and the straight-through
/// estimator returns softmax's gradient instead.
#[test]
fn gradients_of_a_tiny_moe_cnn_match_finite_differences() {
    for (arch, e) in [(Arch::Resnet, 1), (Arch::Vgg, 1), (Arch::Vgg, 2), (Arch::Resnet, 2)] {
        let mut m = Model::new(config(arch, e, 1), 11, DType::F64).unwrap();
        m.st_features = false;
        let x = Var::from_tensor(&images(4, 1, 12, DType::F64)).unwrap();
        let y = labels(4);
        let ctx = Ctx { train: true, track: Track::All };
        let loss_and_routes = |m: &Model, x: &Tensor| {
            let o = m.forward(x, &ctx, Exec::Masked).unwrap();
            let r: Vec<Vec<u32>> = o.routes.iter().map(|r| r.argmax(1).unwrap().to_vec1().unwrap()).collect();
            (cross_entropy(&o.logits, &y).unwrap().to_scalar::<f64>().unwrap(), r)
        };
        let loss = cross_entropy(&m.forward(x.as_tensor(), &ctx, Exec::Masked).unwrap().logits, &y).unwrap();
        let grads = loss.backward().unwrap();
        let h = 1e-6;
        let mut checked = 0;
        let mut targets: Vec<(String, Var)> =
            m.params.iter().filter(|p| !p.name.contains("router")).map(|p| (p.name.clone(), p.var.clone())).collect();
        targets.push(("input".into(), x.clone()));
        for (name, v) in targets {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // A few coordinates per tensor keep the test fast.
            for i in (0..base.len()).step_by((base.len() / 3).max(1)).take(3) {
                let at = |d: f64| {
                    let mut w = base.clone();
                    w[i] += d;
                    v.set(&Tensor::from_vec(w, v.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                    let r = loss_and_routes(&m, x.as_tensor());
                    v.set(&Tensor::from_vec(base.clone(), v.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                    r
                };
                let ((lp, rp), (lm, rm)) = (at(h), at(-h));
                if rp != rm {
                    continue; // the step flipped a routing decision: not differentiable here
                }
                let fd = (lp - lm) / (2.0 * h);
                let tol = 1e-5 * (1.0 + fd.abs().max(g[i].abs()));
                assert!((fd - g[i]).abs() < tol, "{arch:?} {name}[{i}]: autograd {} vs finite difference {fd}", g[i]);
                checked += 1;
            }
        }
        assert!(checked > 20, "{arch:?}: only {checked} coordinates checked");
    }
}

struct StopAfterOne;
impl train::Observer for StopAfterOne {
    fn epoch(&mut self, _: &train::EpochLog, _: &Model, _: &OptState) -> recompose_vision::Result<()> {
        Err(recompose_vision::Error::Config("interrupted".into()))
    }
}

struct Quiet;
impl train::Observer for Quiet {
    fn epoch(&mut self, _: &train::EpochLog, _: &Model, _: &OptState) -> recompose_vision::Result<()> {
        Ok(())
    }
}

#[test]
fn checkpoints_round_trip_and_bad_ones_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = Model::new(config(Arch::Resnet, 2, 3), 3, DType::F32).unwrap();
    let p = d.path().join("m.safetensors");
    m.save(&p, &[]).unwrap();
    let (back, _) = Model::load(&p, DType::F32).unwrap();
    let x = images(4, 3, 1, DType::F32);
    let (a, b) =
        (m.forward(&x, &Ctx::eval(), Exec::Grouped).unwrap(), back.forward(&x, &Ctx::eval(), Exec::Grouped).unwrap());
    assert_eq!(max_abs((a.logits - b.logits).unwrap()), 0.0);
    // Network order: the stem first, the head last (the RWS tools take "first K layers").
    let names: Vec<String> = m.tensors().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("conv1.weight"));
    assert_eq!(names.last().map(String::as_str), Some("fc.bias"));

    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let e = Model::load(&bad, DType::F32).err().unwrap().to_string();
    assert!(e.contains("bad.safetensors") && !e.contains('\n'), "{e}");
    let other = Model::new(config(Arch::Vgg, 2, 3), 3, DType::F32).unwrap();
    let e = other.set_tensors(&m.tensors().unwrap().into_iter().collect(), "m").err().unwrap().to_string();
    assert!(e.contains("missing tensor"), "{e}");
}

#[test]
fn resumed_training_matches_an_uninterrupted_run() {
    let ds = tiny_dataset(32, 9);
    let cfg = |epochs| TrainConfig {
        method: Method::Advmoe,
        epochs,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        beta: 6.0,
        train_attack: Attack::pgd(0.03, 0.02, 1),
        eval_attack: Attack::pgd(0.03, 0.01, 1),
        seed: 4,
        limit: None,
        balance: 0.1,
    };
    let full = Model::new(config(Arch::Vgg, 2, 3), 5, DType::F64).unwrap();
    let mut st = OptState::new(&full, &cfg(2)).unwrap();
    train::train(&full, &mut st, &ds, &ds, &cfg(2), &mut Quiet).unwrap();

    // Interrupted after the first epoch (the observer fails, as a crash would), then resumed.
    let part = Model::new(config(Arch::Vgg, 2, 3), 5, DType::F64).unwrap();
    let mut st1 = OptState::new(&part, &cfg(2)).unwrap();
    assert!(train::train(&part, &mut st1, &ds, &ds, &cfg(2), &mut StopAfterOne).is_err());
    assert_eq!(st1.epoch, 1);
    train::train(&part, &mut st1, &ds, &ds, &cfg(2), &mut Quiet).unwrap();
    for ((n, a), (_, b)) in full.tensors().unwrap().into_iter().zip(part.tensors().unwrap()) {
        // Reductions run in a fixed order: bit for bit.
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{n} differs after resuming"
        );
    }
}

#[test]
fn advmoe_needs_an_moe_model_and_bad_options_are_refused() {
    let dense = Model::new(config(Arch::Vgg, 1, 3), 0, DType::F32).unwrap();
    let mut cfg = TrainConfig {
        method: Method::Advmoe,
        epochs: 1,
        batch_size: 8,
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        beta: 6.0,
        train_attack: Attack::fgsm(0.1),
        eval_attack: Attack::fgsm(0.1),
        seed: 0,
        limit: None,
        balance: 0.0,
    };
    assert!(cfg.validate(&dense).unwrap_err().to_string().contains("MoE"));
    cfg.method = Method::Standard;
    cfg.lr = f64::NAN;
    assert!(cfg.validate(&dense).is_err());
    assert!(Attack::parse("pgd0", 0.1, 0.01).is_err());
    assert!(Attack::parse("cw", 0.1, 0.01).is_err());
    assert!(Attack::parse("pgd10", 2.0, 0.01).is_err());
    assert_eq!(Attack::parse("pgd10", 0.1, 0.01).unwrap().unwrap().steps, 10);
    let e = Model::new(ModelConfig { width: 5, ..config(Arch::Vgg, 2, 3) }, 0, DType::F32).err().unwrap().to_string();
    assert!(e.contains("divisible"), "{e}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_message() {
    let ds = tiny_dataset(32, 1);
    let m = Model::new(config(Arch::Vgg, 1, 3), 0, DType::F32).unwrap();
    let cfg = TrainConfig {
        method: Method::Standard,
        epochs: 3,
        batch_size: 16,
        lr: 1e37,
        momentum: 0.9,
        weight_decay: 0.0,
        beta: 0.0,
        train_attack: Attack::fgsm(0.1),
        eval_attack: Attack::fgsm(0.1),
        seed: 0,
        limit: None,
        balance: 0.0,
    };
    let e =
        train::train(&m, &mut OptState::new(&m, &cfg).unwrap(), &ds, &ds, &cfg, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("lower --lr"), "{e}");
}

/// Regression: two runs of one command differed in 41 of 72 tensors, because the conv weight
/// gradient summed per-thread partials in whatever order rayon finished them. Partial sums now
/// cover fixed groups of images and are added in order.
#[test]
fn two_training_runs_with_one_seed_are_bit_identical() {
    let ds = tiny_dataset(48, 3);
    let cfg = TrainConfig {
        method: Method::PgdAt,
        epochs: 1,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        beta: 6.0,
        train_attack: Attack::pgd(0.03, 0.02, 2),
        eval_attack: Attack::pgd(0.03, 0.01, 1),
        seed: 5,
        limit: None,
        balance: 0.0,
    };
    let run = || {
        let m = Model::new(config(Arch::Vgg, 2, 3), 5, DType::F32).unwrap();
        let mut st = OptState::new(&m, &cfg).unwrap();
        train::train(&m, &mut st, &ds, &ds, &cfg, &mut Quiet).unwrap();
        m.tensors().unwrap()
    };
    let (a, b) = (run(), run());
    for ((n, x), (_, y)) in a.into_iter().zip(b) {
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{n}"
        );
    }
}
