//! The pre-gating router: its gradient against finite differences (f64), training that learns a
//! rule which needs the causal context (every token's expert is set by the row's first token),
//! and the router as the model runs it (routes decided in the step, its keys in the cache) against
//! the router run once over the whole row.

use candle_core::DType;
use recompose_llm::model::step_for;
use recompose_llm::{KvCache, Logits, Plan, WeightMode};
use recompose_moe::router::{self, TrainOptions};
use recompose_moe::MoeModel;

mod common;
use common::tiny;

fn rows(n: usize, t: usize) -> Vec<Vec<u32>> {
    (0..n as u32).map(|r| (0..t as u32).map(|i| (r * 37 + i * 11 + r * i) % 250 + 3).collect()).collect()
}

#[test]
fn router_gradient_matches_finite_differences() {
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 0, DType::F64, WeightMode::F32);
    // Larger weights than the init's 0.02, so every part of the block matters to the loss.
    let g = recompose_moe::testing::scaled_router(&model, 12, 7, 20.0).unwrap();
    let vars: Vec<(String, candle_core::Var)> = g.vars().to_vec();
    model.set_pregate(Some(g));
    let rows = rows(2, 5);
    let targets: Vec<u32> = (0..10).map(|i| (i * 7 % 3) as u32).collect();
    let grads = router::loss(&model, &rows, &targets).unwrap().backward().unwrap();
    let total = || router::loss(&model, &rows, &targets).unwrap().to_scalar::<f64>().unwrap();
    common::check_finite_differences(&vars.iter().collect::<Vec<_>>(), &grads, total, |n| [0, n / 2, n - 1], 1e-3);
}

#[test]
fn router_learns_experts_set_by_the_causal_context() {
    // A row's expert is its first token's id mod 3, for every token of the row: only attention
    // to the first token can tell.
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 0, DType::F32, WeightMode::F32);
    let t = 6;
    let rows: Vec<Vec<u32>> = (0..48u32)
        .map(|r| (0..t as u32).map(|i| if i == 0 { 10 + r % 6 } else { 20 + (r * 5 + i * 7) % 6 }).collect())
        .collect();
    let targets: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[0] % 3; t]).collect();
    model.set_pregate(Some(router::init(&model, 3, 32, 1).unwrap()));
    let opts = TrainOptions { steps: 300, lr: 1e-2, batch: 8, seed: 3 };
    let losses = router::train(&model, &rows, &targets, opts, |_, _| {}).unwrap();
    let right: usize = rows
        .iter()
        .zip(&targets)
        .map(|(r, tg)| model.routes(r).unwrap().iter().zip(tg).filter(|(a, b)| a == b).count())
        .sum();
    let acc = right as f64 / (48 * t) as f64;
    assert!(acc > 0.95, "accuracy {acc} after training (loss {:.3} -> {:.3})", losses[0], losses[losses.len() - 1]);
}

#[test]
fn bad_router_settings_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 0, DType::F32, WeightMode::F32);
    let e = router::init(&model, 1, 8, 0).err().unwrap().to_string();
    assert!(e.contains("1 experts (2 to 64)"), "{e}");
    let opts = TrainOptions { steps: 1, lr: 1e-3, batch: 1, seed: 0 };
    let one_row = |model: &recompose_llm::Model| {
        router::train(model, &rows(1, 4), &[vec![0; 4]], opts, |_, _| {}).err().unwrap().to_string()
    };
    let e = one_row(&model);
    assert!(e.contains("no router"), "{e}");
    model.set_pregate(Some(router::init(&model, 2, 8, 0).unwrap()));
    let e = router::train(&model, &[], &[], opts, |_, _| {}).err().unwrap().to_string();
    assert!(e.contains("0 rows"), "{e}");
    let frozen = model.pregate().unwrap().frozen(&model.config).unwrap();
    model.set_pregate(Some(frozen));
    let e = one_row(&model);
    assert!(e.contains("frozen"), "{e}");
}

#[test]
fn the_routers_cached_steps_pick_what_one_pass_over_the_row_picks() {
    for (arch, mode) in [("llama", WeightMode::F32), ("gemma3", WeightMode::Quantized)] {
        let d = tempfile::tempdir().unwrap();
        let (f, mut model) = tiny(d.path(), arch, 3, DType::F32, mode);
        common::moe(&f, &model, None).apply(&mut model).unwrap();
        let row = rows(1, 24).remove(0);
        let want = model.routes(&row).unwrap();
        assert!(want.iter().any(|&e| e != want[0]), "{arch}: the router picks one expert throughout: {want:?}");
        // Prefill 10, then one token a step: the routes the blocks got come back as usage.
        let mut cache = model.new_cache(1);
        let mut got = vec![];
        let mut fed = 0;
        for n in [10usize, 1, 1, 5, 1, 6] {
            let (tokens, step) = step_for(&[row[fed..fed + n].to_vec()], &cache, 0);
            let out = model.forward_with(&tokens, &step, &mut [&mut cache], Logits::Last, &Plan::default()).unwrap();
            let usage = out.ffn[0].usage.clone().unwrap();
            // One token a step: its expert is the one used.
            if n == 1 {
                got.push(usage.iter().position(|&u| u == 1).unwrap() as u32);
            } else {
                let mut counts = vec![0u64; 3];
                for &e in &want[fed..fed + n] {
                    counts[e as usize] += 1;
                }
                assert_eq!(usage, counts, "{arch}: a prefill piece's expert load");
                got.extend_from_slice(&want[fed..fed + n]);
            }
            fed += n;
        }
        assert_eq!(got, want[..fed], "{arch}: routes step by step");
        assert_eq!(model.cache_layout().num_layers, model.layers.len() + 1, "{arch}: the router has a cache layer");
    }
}

#[test]
fn a_moe_model_runs_like_its_ffns_given_the_routers_routes() {
    let d = tempfile::tempdir().unwrap();
    let (f, mut model) = tiny(d.path(), "llama", 4, DType::F32, WeightMode::F32);
    let moe = common::moe(&f, &model, None);
    let split = moe.config.split.clone();
    moe.apply(&mut model).unwrap();
    let row = rows(1, 12).remove(0);
    let routes = model.routes(&row).unwrap();
    let logits = |plan: &Plan| -> Vec<f32> {
        let mut cache = model.new_cache(1);
        let (tokens, step) = step_for(&[row.clone()], &cache, 0);
        let out = model.forward_with(&tokens, &step, &mut [&mut cache], Logits::All, plan).unwrap();
        out.logits.flatten_all().unwrap().to_vec1().unwrap()
    };
    let by_router = logits(&Plan::default());
    let given = logits(&Plan { routes: Some(vec![routes.clone()]), ..Default::default() });
    assert_eq!(by_router, given);
    // Other routes give other logits (the routes matter), and a packed step gives the same.
    let other: Vec<u32> = routes.iter().map(|&e| (e + 1) % 3).collect();
    assert_ne!(logits(&Plan { routes: Some(vec![other]), ..Default::default() }), by_router);
    let mut cache = model.new_cache(1);
    let mut caches: Vec<&mut dyn KvCache> = vec![&mut cache];
    let packed = model.forward_packed(&row, &[0], &[row.len()], &[true], &mut caches, Logits::All).unwrap();
    let packed: Vec<f32> = packed.flatten_all().unwrap().to_vec1().unwrap();
    let worst = packed.iter().zip(&by_router).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "packed step off by {worst}");
    assert_eq!(split.names.len(), 3);
}

#[test]
fn a_saved_moe_reads_back_and_refuses_another_model_or_a_corrupt_config() {
    let d = tempfile::tempdir().unwrap();
    let (f, model) = tiny(d.path(), "llama", 0, DType::F32, WeightMode::F32);
    let (other_file, _) = tiny(d.path(), "llama", 9, DType::F32, WeightMode::F32);
    let out = d.path().join("moe");
    let moe = common::moe(&f, &model, None);
    moe.save(&out).unwrap();
    let back = MoeModel::load(&out, &f).unwrap();
    assert_eq!(back.config.split, moe.config.split);
    for ((na, a), (nb, b)) in back.router.as_ref().unwrap().tensors().iter().zip(moe.router.as_ref().unwrap().tensors())
    {
        assert_eq!(na, nb);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let e = MoeModel::load(&out, &other_file).err().unwrap().to_string();
    assert!(e.contains("made for another model"), "{e}");
    // A router file of another model's MoE, dropped into this folder.
    let (_, other_model) = tiny(d.path(), "llama", 9, DType::F32, WeightMode::F32);
    let foreign = d.path().join("foreign");
    common::moe(&other_file, &other_model, None).save(&foreign).unwrap();
    let mixed = d.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(out.join("config.json"), mixed.join("config.json")).unwrap();
    std::fs::copy(foreign.join("router.safetensors"), mixed.join("router.safetensors")).unwrap();
    let e = MoeModel::load(&mixed, &f).err().unwrap().to_string();
    assert!(e.contains("a router for another model"), "{e}");
    let cfg = out.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, &text[..text.len() / 2]).unwrap();
    let e = MoeModel::load(&out, &f).err().unwrap().to_string();
    assert!(e.contains("not JSON"), "{e}");
    std::fs::write(&cfg, text.replace("\"keep\"", "\"kept\"")).unwrap();
    let e = MoeModel::load(&out, &f).err().unwrap().to_string();
    assert!(e.contains("a corrupt MoE config"), "{e}");
    std::fs::write(&cfg, r#"{"format":"something-else"}"#).unwrap();
    let e = MoeModel::load(&out, &f).err().unwrap().to_string();
    assert!(e.contains("not a recompose-moe/1 config"), "{e}");
    std::fs::write(&cfg, &text).unwrap();
    let st = out.join("router.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert!(MoeModel::load(&out, &f).is_err());
}
