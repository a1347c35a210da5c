//! The differentiable mode on tiny seeded Llama and Gemma 3 models, in f64: autograd equals
//! central finite differences for every kind of parameter (embeddings, norms, attention and MLP
//! weights, Gemma's QK and sandwich norms, LoRA factors on all seven targets); checkpointed and
//! plain gradients agree; the FFN seam carries context and side outputs; the quantised path
//! refuses gradients.

use candle_core::{DType, Device, Tensor, Var};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::ffn::{DenseFfn, Ffn, FfnContext, FfnOutput};
use recompose_llm::grad::IGNORE;
use recompose_llm::lora::{LoraConfig, Target};
use recompose_llm::{Batch, LoadOptions, Model, Plan, Trainable, WeightMode};

fn tiny(arch: &'static str, layers: usize, dir: &std::path::Path) -> ModelFile {
    let path = dir.join(format!("{arch}.gguf"));
    let spec = TinySpec {
        arch,
        layers,
        hidden: 16,
        heads: 4,
        kv_heads: 2,
        ffn: 24,
        context: 64,
        seed: 3,
        ..Default::default()
    };
    write_tiny_gguf(&path, &spec).unwrap();
    ModelFile::open(&path).unwrap()
}

fn load(file: &ModelFile, trainable: Trainable) -> Model {
    Model::load_with(file, LoadOptions { mode: WeightMode::F32, dtype: DType::F64, trainable, ..Default::default() })
        .unwrap()
}

/// Two rows of 12 tokens (longer than the tiny Gemma's 8-token window), a few targets ignored.
fn batch() -> Batch {
    let row = |s: u32| -> (Vec<u32>, Vec<u32>) {
        let tok: Vec<u32> = (0..12).map(|i| (s * 31 + i * 17) % 256).collect();
        let mut tgt: Vec<u32> = tok[1..].to_vec();
        tgt.push(IGNORE);
        tgt[2] = IGNORE;
        (tok, tgt)
    };
    Batch::from_rows(&[row(1), row(2)], 0).unwrap()
}

fn max_abs(t: Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn rand(shape: (usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1;
    let v: Vec<f64> = (0..n)
        .map(|i| ((recompose_llm::lora::mix(seed ^ i as u64) >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.4)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// LoRA on all seven targets with random (not PEFT's zero) B, so that A has a gradient too.
fn add_random_lora(model: &mut Model, rank: usize) {
    let mut factors = vec![];
    for (i, (path, lin)) in model.block_linears().into_iter().enumerate() {
        let (out, inp) = lin.dims();
        factors.push((path, rand((rank, inp), 100 + i as u64), rand((out, rank), 200 + i as u64)));
    }
    model.set_lora(factors, 1.5, 0.0, true).unwrap();
}

fn loss_value(model: &Model, b: &Batch, scale: f64) -> f64 {
    let (nll, aux) = model.loss(b, &Plan::default(), scale).unwrap();
    let total = match aux {
        Some(a) => (nll + a).unwrap(),
        None => nll,
    };
    total.to_scalar::<f64>().unwrap()
}

/// For every parameter: autograd vs central differences at its 3 largest-gradient coordinates
/// and one fixed other; returns the largest relative error and the number of kinds checked.
fn finite_difference_check(model: &Model, b: &Batch) -> (f64, Vec<String>) {
    let scale = 1.0 / b.target_count() as f64;
    let params: Vec<(String, Var)> = model.params().to_vec();
    let vars: Vec<Var> = params.iter().map(|p| p.1.clone()).collect();
    let g = model.loss_and_grads(b, &Plan::default(), &vars, scale, false).unwrap();
    let mut worst = 0f64;
    let mut kinds = std::collections::BTreeSet::new();
    for ((name, var), grad) in params.iter().zip(&g.grads) {
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
        let gv: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let base = var.as_tensor().copy().unwrap();
        let bv: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
        let mut idx: Vec<usize> = (0..gv.len()).collect();
        idx.sort_by(|&a, &c| gv[c].abs().total_cmp(&gv[a].abs()));
        let mut picks: Vec<usize> = idx.into_iter().take(3).collect();
        picks.push(gv.len() / 2);
        for k in picks {
            let at = |d: f64| {
                let mut p = bv.clone();
                p[k] += d;
                var.set(&Tensor::from_vec(p, base.shape(), &Device::Cpu).unwrap()).unwrap();
                loss_value(model, b, scale)
            };
            let eps = 1e-6;
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&base).unwrap();
            let denom = fd.abs().max(gv[k].abs());
            if denom < 1e-9 {
                continue; // both zero: nothing to compare
            }
            let err = (fd - gv[k]).abs() / denom;
            assert!(err < 1e-3, "{name}[{k}]: autograd {} vs finite difference {fd} (rel. error {err:.2e})", gv[k]);
            worst = worst.max(err);
        }
        // The kind: the name without its layer number.
        let kind = name.split('.').filter(|p| p.parse::<usize>().is_err()).collect::<Vec<_>>().join(".");
        kinds.insert(kind);
    }
    (worst, kinds.into_iter().collect())
}

fn check_arch(arch: &'static str, layers: usize, want_kinds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(arch, layers, dir.path());
    let mut model = load(&file, Trainable::All);
    add_random_lora(&mut model, 2);
    let (worst, kinds) = finite_difference_check(&model, &batch());
    eprintln!("{arch}: {} parameter kinds, max relative error {worst:.2e}: {kinds:?}", kinds.len());
    assert_eq!(kinds.len(), want_kinds, "{kinds:?}");
    assert!(kinds.iter().any(|k| k.ends_with("lora_A.weight")) && kinds.iter().any(|k| k.contains("down_proj.lora_B")));
}

#[test]
fn llama_gradients_equal_finite_differences_for_every_parameter_kind() {
    // embed (tied head), final norm, 2 norms + 7 linears + 14 LoRA factors per block.
    check_arch("llama", 2, 2 + 2 + 7 + 14);
}

#[test]
fn gemma3_gradients_equal_finite_differences_for_every_parameter_kind() {
    // Gemma adds QK norms and two sandwich norms; 6 layers so both sliding and global attention run.
    check_arch("gemma3", 6, 2 + 6 + 7 + 14);
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, layers) in [("llama", 3), ("gemma3", 6)] {
        let file = tiny(arch, layers, dir.path());
        let mut model = load(&file, Trainable::All);
        add_random_lora(&mut model, 3);
        let b = batch();
        let vars: Vec<Var> = model.params().iter().map(|p| p.1.clone()).collect();
        let plain = model.loss_and_grads(&b, &Plan::default(), &vars, 0.1, false).unwrap();
        let ckpt = model.loss_and_grads(&b, &Plan::default(), &vars, 0.1, true).unwrap();
        assert!((plain.loss - ckpt.loss).abs() < 1e-12);
        for ((name, _), (a, c)) in model.params().iter().zip(plain.grads.iter().zip(&ckpt.grads)) {
            let d = (a.as_ref().unwrap() - c.as_ref().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-12, "{arch} {name}");
        }
    }
}

#[test]
fn lora_dropout_is_seeded_and_the_same_in_the_checkpointed_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny("llama", 2, dir.path());
    let mut model = load(&file, Trainable::None);
    let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.3, targets: Target::ALL.to_vec(), rslora: false };
    model.add_lora(&cfg, 1).unwrap();
    // B starts at zero (PEFT): give it values so the branch matters.
    for (name, v) in model.params().to_vec() {
        if name.ends_with("lora_B.weight") {
            let (r, c) = v.as_tensor().dims2().unwrap();
            v.set(&rand((r, c), 5)).unwrap();
        }
    }
    let b = batch();
    let vars: Vec<Var> = model.params().iter().map(|p| p.1.clone()).collect();
    let plan = |seed| Plan { dropout_seed: Some(seed), ..Default::default() };
    let a = model.loss_and_grads(&b, &plan(7), &vars, 0.1, false).unwrap();
    let c = model.loss_and_grads(&b, &plan(7), &vars, 0.1, true).unwrap();
    let other = model.loss_and_grads(&b, &plan(8), &vars, 0.1, false).unwrap();
    assert!((a.loss - c.loss).abs() < 1e-12, "same seed: {} vs {}", a.loss, c.loss);
    assert!((a.loss - other.loss).abs() > 1e-9, "another seed drops other features");
    let off = model.loss_and_grads(&b, &Plan::default(), &vars, 0.1, false).unwrap();
    assert!((a.loss - off.loss).abs() > 1e-9, "no seed: no dropout");
}

#[test]
fn gradients_on_the_quantised_path_are_an_error_not_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8.gguf");
    let spec = TinySpec { dtype: candle_core::quantized::GgmlDType::Q8_0, ..Default::default() };
    write_tiny_gguf(&path, &spec).unwrap();
    let file = ModelFile::open(&path).unwrap();
    let mut model = Model::load(&file, WeightMode::Quantized).unwrap();
    model.add_lora(&LoraConfig::default(), 0).unwrap();
    let vars: Vec<Var> = model.params().iter().map(|p| p.1.clone()).collect();
    let b = batch();
    let e = match model.loss_and_grads(&b, &Plan::default(), &vars, 0.1, true) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("gradients through quantised weights must be refused"),
    };
    assert!(e.contains("quantised") && e.contains("f32"), "{e}");
    let e = Model::load_with(&file, LoadOptions { trainable: Trainable::All, ..Default::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("quantised") && e.contains("f32"), "{e}");
}

/// A second FFN for the seam: two dense experts picked per token by the plan's route, reporting
/// usage and a load-balancing auxiliary loss.
struct TwoExperts {
    experts: [DenseFfn; 2],
    seen: std::sync::Mutex<Vec<(usize, usize, usize)>>,
}

impl Ffn for TwoExperts {
    fn forward(&self, x: &Tensor, ctx: &FfnContext) -> recompose_llm::Result<FfnOutput> {
        self.seen.lock().unwrap().push((ctx.layer, ctx.batch, ctx.t));
        let route = ctx.route.expect("a route for every token");
        assert_eq!(route.len(), x.dim(0)?);
        let y0 = self.experts[0].forward(x, ctx)?.y;
        let y1 = self.experts[1].forward(x, ctx)?.y;
        let pick: Vec<f64> = route.iter().map(|&r| r as f64).collect();
        let m = Tensor::from_vec(pick, (route.len(), 1), x.device())?.to_dtype(x.dtype())?;
        let y = (y0.broadcast_mul(&(1.0 - &m)?)? + y1.broadcast_mul(&m)?)?;
        let ones = route.iter().filter(|&&r| r == 1).count() as u64;
        let usage = vec![route.len() as u64 - ones, ones];
        // A differentiable auxiliary term: the mean square of the output, weighted.
        let aux = (y.sqr()?.mean_all()? * 0.01)?;
        Ok(FfnOutput { y, aux_loss: Some(aux), usage: Some(usage) })
    }
}

#[test]
fn a_second_ffn_gets_routes_and_context_and_its_aux_loss_trains() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny("llama", 2, dir.path());
    let mut model = load(&file, Trainable::None);
    let mk = |l: usize, s: u64| {
        let lin = |name: &str, shape: (usize, usize), seed: u64| {
            let v = Var::from_tensor(&rand(shape, seed)).unwrap();
            (recompose_llm::linear::Linear::dense(name, v.as_tensor().clone()), (format!("l{l}.{name}"), v))
        };
        let (g, pg) = lin("gate", (24, 16), s);
        let (u, pu) = lin("up", (24, 16), s + 1);
        let (d, pd) = lin("down", (16, 24), s + 2);
        (DenseFfn { gate: g, up: u, down: d, activation: recompose_core::config::Activation::Silu }, vec![pg, pu, pd])
    };
    let mut params = vec![];
    for l in 0..2 {
        let (e0, p0) = mk(l, 10 * l as u64);
        let (e1, p1) = mk(l, 10 * l as u64 + 5);
        params.extend(p0.into_iter().chain(p1));
        model.layers[l].ffn = Box::new(TwoExperts { experts: [e0, e1], seen: Default::default() });
    }
    let b = batch();
    let route: Vec<u32> = (0..b.rows * b.t).map(|i| (i % 3 == 0) as u32).collect();
    let plan = Plan { routes: Some(vec![route.clone()]), ..Default::default() };
    let out = model.forward_train(&b, &plan).unwrap();
    for side in &out.ffn {
        let want =
            vec![route.iter().filter(|&&r| r == 0).count() as u64, route.iter().filter(|&&r| r == 1).count() as u64];
        assert_eq!(side.usage.as_ref().unwrap(), &want);
        assert!(side.aux_loss.is_some());
    }
    // Gradients reach the experts through the LM loss and the auxiliary loss, and match with
    // and without checkpointing; finite differences confirm the aux term is included.
    let vars: Vec<Var> = params.iter().map(|p| p.1.clone()).collect();
    let plain = model.loss_and_grads(&b, &plan, &vars, 0.05, false).unwrap();
    let ckpt = model.loss_and_grads(&b, &plan, &vars, 0.05, true).unwrap();
    assert!(plain.aux > 0.0 && (plain.aux - ckpt.aux).abs() < 1e-12);
    let (name, v) = &params[0];
    let g = plain.grads[0].as_ref().unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let g2 = ckpt.grads[0].as_ref().unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let base = v.as_tensor().copy().unwrap();
    let bv: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
    let total = |d: f64| {
        let mut p = bv.clone();
        p[5] += d;
        v.set(&Tensor::from_vec(p, base.shape(), &Device::Cpu).unwrap()).unwrap();
        let (nll, aux) = model.loss(&b, &plan, 0.05).unwrap();
        (nll + aux.unwrap()).unwrap().to_scalar::<f64>().unwrap()
    };
    let fd = (total(1e-6) - total(-1e-6)) / 2e-6;
    v.set(&base).unwrap();
    assert!((fd - g[5]).abs() / fd.abs().max(1e-12) < 1e-4, "{name}: {fd} vs {}", g[5]);
    assert!((g[5] - g2[5]).abs() < 1e-12);
}

#[test]
fn elastic_prefixes_equal_a_model_cut_to_them() {
    // Running the first KV head (and its query group) and the first 12 FFN channels through the
    // plan gives the logits of a model whose weights are those prefixes.
    let dir = tempfile::tempdir().unwrap();
    let file = tiny("llama", 2, dir.path());
    let model = load(&file, Trainable::None);
    let b = batch();
    let plan =
        Plan { kv_heads: Some(vec![1, 1]), ffn_widths: Some(vec![vec![12, 12], vec![12, 12]]), ..Default::default() };
    let elastic = model.forward_train(&b, &plan).unwrap().logits;
    // The cut model: a GGUF with per-layer sizes and the prefix weights.
    let cut = dir.path().join("cut.gguf");
    recompose_core::testing::write_prefix_gguf(&file, &cut, &[(1, 12), (1, 12)]).unwrap();
    let small = load(&ModelFile::open(&cut).unwrap(), Trainable::None);
    assert_eq!(small.config.dims(0).kv_heads, 1);
    let want = small.forward_train(&b, &Plan::default()).unwrap().logits;
    let d = max_abs((elastic - want).unwrap());
    assert!(d < 1e-10, "{d}");
    // Layers of different sizes: a heterogeneous config read from per-layer GGUF arrays.
    recompose_core::testing::write_prefix_gguf(&file, &dir.path().join("mixed.gguf"), &[(1, 12), (2, 24)]).unwrap();
    let mixed_model = load(&ModelFile::open(dir.path().join("mixed.gguf")).unwrap(), Trainable::None);
    assert_eq!(mixed_model.config.layer_dims.len(), 2);
    let plan =
        Plan { kv_heads: Some(vec![1, 2]), ffn_widths: Some(vec![vec![12, 12], vec![24, 24]]), ..Default::default() };
    let a = model.forward_train(&b, &plan).unwrap().logits;
    let c = mixed_model.forward_train(&b, &Plan::default()).unwrap().logits;
    let d = max_abs((a - c).unwrap());
    assert!(d < 1e-10, "{d}");
    // Mixed widths in one batch: each row as if run alone.
    let plan = Plan { ffn_widths: Some(vec![vec![12, 24], vec![12, 24]]), ..Default::default() };
    let mixed = model.forward_train(&b, &plan).unwrap().logits;
    let narrow = Plan { ffn_widths: Some(vec![vec![12, 12], vec![12, 12]]), ..Default::default() };
    let a = model.forward_train(&b, &narrow).unwrap().logits.get(0).unwrap();
    let full = model.forward_train(&b, &Plan::default()).unwrap().logits.get(1).unwrap();
    let d0 = max_abs((mixed.get(0).unwrap() - a).unwrap());
    let d1 = max_abs((mixed.get(1).unwrap() - full).unwrap());
    assert!(d0 < 1e-10 && d1 < 1e-10, "{d0} {d1}");
}
