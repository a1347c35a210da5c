//! Expert fine-tuning: the gradient of an expert's weight through the whole model against finite
//! differences (f64), training that lowers the held-out loss, and fine-tuned experts that save,
//! load and run as trained (f32 exactly, on the packed kernels within int8 rounding), behind
//! the pre-gate or behind layer-wise gates.

use candle_core::DType;
use recompose_llm::model::step_for;
use recompose_llm::{Batch, Logits, Model, Plan, WeightMode};
use recompose_moe::Routing;
use recompose_moe::{MoeConfig, MoeModel};
use recompose_train::finetune::{Observer, Paths};

mod common;
use common::tiny;

/// Rows of a repeating pattern the tiny model can learn.
fn rows(n: usize, t: usize, offset: u32) -> Vec<Vec<u32>> {
    (0..n as u32).map(|r| (0..t as u32).map(|i| 3 + (i * 7 + r + offset) % 13).collect()).collect()
}

struct Quiet;
impl Observer for Quiet {}

#[test]
fn an_experts_gradient_through_the_model_matches_finite_differences() {
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 2, DType::F64, WeightMode::F32);
    let s = common::split(&model);
    let r = common::router(&model);
    let vars = recompose_moe::finetune::prepare(&mut model, &s, Routing::PreGate(r)).unwrap();
    let rs = rows(2, 9, 0);
    let batch =
        Batch::from_rows(&rs.iter().map(|r| (r[..8].to_vec(), r[1..].to_vec())).collect::<Vec<_>>(), 0).unwrap();
    let routes: Vec<u32> = rs.iter().flat_map(|r| model.routes(&r[..8]).unwrap()).collect();
    assert!(routes.iter().any(|&e| e != routes[0]), "one expert for every token: {routes:?}");
    let loss = |model: &Model| model.loss(&batch, &Plan::default(), 1.0).unwrap().0;
    let grads = loss(&model).backward().unwrap();
    // The permanent part and every expert of layer 0, and the last layer's down projection.
    let checked: Vec<&(String, candle_core::Var)> =
        vars.iter().filter(|(n, _)| n.contains("layers.0.") || n.contains("layers.1.mlp.experts.2.down")).collect();
    assert!(checked.len() >= 10);
    let total = || loss(&model).to_scalar::<f64>().unwrap();
    common::check_finite_differences(&checked, &grads, total, |n| [0, n / 3, n - 1], 1e-4);
}

#[test]
fn fine_tuned_experts_lower_the_loss_and_run_as_trained_after_saving() {
    let d = tempfile::tempdir().unwrap();
    let (f, mut model) = tiny(d.path(), "llama", 2, DType::F32, WeightMode::F32);
    let s = common::split(&model);
    let r = common::router(&model);
    let base = recompose_moe::format::identity(&f).unwrap();
    let train = recompose_moe::finetune::dataset(&rows(16, 24, 0), "train");
    let held = recompose_moe::finetune::dataset(&rows(4, 24, 100), "held");
    let cfg = recompose_moe::finetune::config(30, 4, 1e-2);
    let paths = Paths::beside(&d.path().join("ft"));
    let router_copy = r.frozen(&model.config).unwrap();
    let (summary, weights) = recompose_moe::finetune::run(
        &mut model,
        &base,
        &s,
        Routing::PreGate(r),
        &train,
        &held,
        &cfg,
        &paths,
        &mut Quiet,
    )
    .unwrap();
    let (before, after) = (summary.first_eval.unwrap().eval_loss, summary.last_eval.unwrap().eval_loss);
    assert!(after < 0.7 * before, "held-out loss {before} -> {after}");
    // Saved and applied to a fresh copy of the base, the experts give the trained model's logits.
    let dir = d.path().join("moe");
    let moe = MoeModel {
        config: MoeConfig {
            format: recompose_moe::format::FORMAT.into(),
            base,
            split: s,
            router: Some(router_copy.config),
            layerwise: false,
        },
        router: Some(router_copy),
        gates: None,
        experts: Some(weights),
    };
    moe.save(&dir).unwrap();
    let row = rows(1, 16, 7).remove(0);
    let logits_with = |m: &Model, plan: &Plan| -> Vec<f32> {
        let mut cache = m.new_cache(1);
        let (tokens, step) = step_for(&[row.clone()], &cache, 0);
        let out = m.forward_with(&tokens, &step, &mut [&mut cache], Logits::All, plan).unwrap();
        out.logits.flatten_all().unwrap().to_vec1().unwrap()
    };
    let logits = |m: &Model| logits_with(m, &Plan::default());
    let want = logits(&model);
    let (_, mut fresh) = tiny(d.path(), "llama", 2, DType::F32, WeightMode::F32);
    MoeModel::load(&dir, &f).unwrap().apply(&mut fresh).unwrap();
    let got = logits(&fresh);
    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "reloaded experts off by {worst}");
    // On a quantised base the experts run packed (Q8_0): close, not equal, given the same
    // routes (the router runs packed too, and a close call may go the other way).
    let (_, mut packed) = tiny(d.path(), "llama", 2, DType::F32, WeightMode::Quantized);
    MoeModel::load(&dir, &f).unwrap().apply(&mut packed).unwrap();
    let routes = Plan { routes: Some(vec![packed.routes(&row).unwrap()]), ..Default::default() };
    let want = logits_with(&model, &routes);
    let got = logits_with(&packed, &routes);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 0.05 * scale, "packed experts off by {worst} (scale {scale})");
    // A truncated experts file is refused.
    let p = dir.join("experts.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert!(MoeModel::load(&dir, &f).is_err());
}

#[test]
fn a_layer_wise_moe_fine_tunes_saves_and_runs_as_trained() {
    let d = tempfile::tempdir().unwrap();
    let (f, mut model) = tiny(d.path(), "llama", 2, DType::F32, WeightMode::F32);
    let s = common::split(&model);
    let gates = recompose_moe::testing::gates(&model).unwrap();
    let base = recompose_moe::format::identity(&f).unwrap();
    let train = recompose_moe::finetune::dataset(&rows(16, 24, 0), "train");
    let held = recompose_moe::finetune::dataset(&rows(4, 24, 100), "held");
    let cfg = recompose_moe::finetune::config(30, 4, 1e-2);
    let paths = Paths::beside(&d.path().join("ft"));
    let run = recompose_moe::finetune::run(
        &mut model,
        &base,
        &s,
        Routing::Layerwise(&gates),
        &train,
        &held,
        &cfg,
        &paths,
        &mut Quiet,
    );
    let (summary, weights) = run.unwrap();
    let (before, after) = (summary.first_eval.unwrap().eval_loss, summary.last_eval.unwrap().eval_loss);
    assert!(after < 0.7 * before, "held-out loss {before} -> {after}");
    let config =
        MoeConfig { format: recompose_moe::format::FORMAT.into(), base, split: s, router: None, layerwise: true };
    let moe = MoeModel { config, router: None, gates: Some(gates), experts: Some(weights) };
    let dir = d.path().join("layerwise");
    moe.save(&dir).unwrap();
    let row = rows(1, 16, 7).remove(0);
    let logits = |m: &Model| -> Vec<f32> {
        let mut cache = m.new_cache(1);
        let (tokens, step) = step_for(&[row.clone()], &cache, 0);
        let out = m.forward_with(&tokens, &step, &mut [&mut cache], Logits::All, &Plan::default()).unwrap();
        out.logits.flatten_all().unwrap().to_vec1().unwrap()
    };
    let want = logits(&model);
    let (_, mut fresh) = tiny(d.path(), "llama", 2, DType::F32, WeightMode::F32);
    MoeModel::load(&dir, &f).unwrap().apply(&mut fresh).unwrap();
    assert!(fresh.pregate().is_none(), "layer-wise routing puts no router in front");
    let worst = want.iter().zip(&logits(&fresh)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "reloaded layer-wise MoE off by {worst}");
    // Without its gates, or with a router as well, the folder is refused.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::rename(dir.join("gates.safetensors"), d.path().join("gates")).unwrap();
    let e = MoeModel::load(&dir, &f).err().unwrap().to_string();
    assert!(e.contains("gates.safetensors"), "{e}");
    std::fs::rename(d.path().join("gates"), dir.join("gates.safetensors")).unwrap();
    let with_router = cfg.replace(r#""router":null"#, r#""router":{"experts":3,"ffn":16}"#);
    assert_ne!(with_router, cfg);
    std::fs::write(dir.join("config.json"), with_router).unwrap();
    let e = MoeModel::load(&dir, &f).err().unwrap().to_string();
    assert!(e.contains("a router and layer-wise gates"), "{e}");
}
