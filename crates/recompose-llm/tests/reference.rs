//! Exactness against the reference implementations, on the real models (fetched as assets):
//! tokenizer ids vs HF transformers and llama.cpp, f32 logits vs transformers (same GGUF,
//! dequantised), quantised greedy continuations vs llama.cpp. Fixtures come from
//! bench/make_fixtures.py.

use recompose_core::weights::ModelFile;
use recompose_llm::generate::{generate, GenerateOptions};
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model, WeightMode};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn open(asset: &str) -> ModelFile {
    let path = recompose_assets::main_file(asset).unwrap();
    ModelFile::open(path).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_tokenizer(asset: &str) {
    let f = open(asset);
    let tok = f.tokenizer().unwrap();
    let fx = fixture(&format!("tokenizer_{asset}.json"));
    let mut n = 0;
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["hf_ids"]);
        assert_eq!(ids(&case["llamacpp_ids"]), want, "the two references disagree on {text:?}");
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{asset}: ids of {text:?}");
        n += 1;
    }
    assert!(n >= 20);
    assert_eq!(tok.add_bos, fx["add_bos_token"].as_bool().unwrap());
}

#[test]
fn tokenizer_matches_references_smollm2() {
    check_tokenizer("smollm2-135m");
}

#[test]
fn tokenizer_matches_references_gemma3() {
    check_tokenizer("gemma3-270m");
}

/// Max |ours - transformers| over the fixture's logits (top-20 and 64 sampled ids per position).
fn max_logit_diff(model: &Model, ids_: &[u32], positions: &[Value], sample_ids: &[u32]) -> f32 {
    let mut cache = model.new_cache(1);
    let (tokens, step) = step_for(&[ids_.to_vec()], &cache, 0);
    let logits = model.forward(&tokens, &step, &mut cache, Logits::All).unwrap();
    let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    let mut max = 0f32;
    for p in positions {
        let pos = p["pos"].as_u64().unwrap() as usize;
        for pair in p["top"].as_array().unwrap() {
            let (id, v) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            max = max.max((rows[pos][id] - v).abs());
        }
        for (id, v) in sample_ids.iter().zip(p["sample"].as_array().unwrap()) {
            max = max.max((rows[pos][*id as usize] - v.as_f64().unwrap() as f32).abs());
        }
    }
    max
}

fn check_logits(asset: &str) {
    let f = open(asset);
    let model = Model::load(&f, WeightMode::F32).unwrap();
    let tok = f.tokenizer().unwrap();
    let fx = fixture(&format!("logits_{asset}.json"));
    let sample_ids = ids(&fx["sample_ids"]);
    let mut cases: Vec<&Value> = fx["prompts"].as_array().unwrap().iter().collect();
    cases.push(&fx["long_prompt"]);
    for case in cases {
        let want_ids = ids(&case["ids"]);
        if let Some(text) = case.get("text").and_then(Value::as_str) {
            assert_eq!(tok.encode(text, true).unwrap(), want_ids, "{asset}: prompt ids of {text:?}");
        }
        let d = max_logit_diff(&model, &want_ids, case["positions"].as_array().unwrap(), &sample_ids);
        eprintln!("{asset}: {} tokens, max |logit diff| {d:.2e}", want_ids.len());
        assert!(d <= 1e-3, "{asset}: max |logit diff| {d} > 1e-3 on a {}-token prompt", want_ids.len());
    }
}

#[test]
fn f32_logits_match_transformers_smollm2() {
    check_logits("smollm2-135m");
}

#[test]
fn f32_logits_match_transformers_gemma3() {
    check_logits("gemma3-270m");
}

/// Teacher-forced along llama.cpp's greedy path: per step, the largest distance between our logit
/// and llama.cpp's over llama.cpp's top-5 tokens.
fn teacher_forced_diffs(model: &Model, prompt: &[u32], want: &[u32], steps: &[Value]) -> Vec<f32> {
    let full: Vec<u32> = prompt.iter().chain(want).copied().collect();
    let mut cache = model.new_cache(1);
    let (tokens, step) = step_for(&[full], &cache, 0);
    let logits = model.forward(&tokens, &step, &mut cache, Logits::From(prompt.len() - 1)).unwrap();
    let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    steps
        .iter()
        .zip(&rows)
        .map(|(s, row)| {
            s["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (row[p[0].as_u64().unwrap() as usize] - p[1].as_f64().unwrap() as f32).abs())
                .fold(0f32, f32::max)
        })
        .collect()
}

/// The quantised path against llama.cpp. Teacher-forced along llama.cpp's greedy path, our
/// quantised logits may be no further from llama.cpp's than our exact f32 path is (itself 1e-3
/// from transformers, see above) plus a quantisation margin. Our own greedy continuation must
/// equal llama.cpp's or split first at a step whose llama.cpp top-2 gap is within twice the logit
/// difference measured there (a near-tie the numeric difference explains).
fn check_greedy(asset: &str) {
    let f = open(asset);
    let model = Model::load(&f, WeightMode::Quantized).unwrap();
    let exact = Model::load(&f, WeightMode::F32).unwrap();
    let tok = f.tokenizer().unwrap();
    let fx = fixture(&format!("llamacpp_greedy_{asset}.json"));
    for case in fx["prompts"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let steps = case["steps"].as_array().unwrap();
        let want: Vec<u32> = steps.iter().map(|s| s["chosen"].as_u64().unwrap() as u32).collect();
        let diffs = teacher_forced_diffs(&model, &prompt, &want, steps);
        let max = |d: &[f32]| d.iter().copied().fold(0f32, f32::max);
        let (max_diff, exact_diff) = (max(&diffs), max(&teacher_forced_diffs(&exact, &prompt, &want, steps)));
        // The exact path's own distance to llama.cpp depends on the prompt and the machine: up to
        // 0.56 (quantised 0.88) on the machine this test was written on, 1.19 (quantised 1.17, and
        // 1.25 on the scalar kernels) on the fibonacci prompt on a later one, where a fixed bound
        // of 1.0 failed. Quantisation adds a few tenths; a wrong kernel or layout, whole units.
        assert!(
            max_diff <= exact_diff + 0.5,
            "{asset}: quantised logits differ from llama.cpp's by {max_diff}, the exact path's by {exact_diff}"
        );
        let opts = GenerateOptions { max_tokens: want.len(), ignore_eos: true, ..Default::default() };
        let (gens, _) = generate(&model, &tok, &[prompt], &opts, |_| Box::new(model.new_cache(1)), |_, _| {}).unwrap();
        let got = &gens[0].tokens;
        let split = got.iter().zip(&want).position(|(a, b)| a != b);
        eprintln!(
            "{asset}: {:?}: max |logit diff| vs llama.cpp {max_diff:.3} (exact path {exact_diff:.3}); {}",
            case["text"],
            match split {
                None => "greedy continuation identical".to_string(),
                Some(i) => format!(
                    "splits at step {i}: llama.cpp top-2 gap {:.4}, our diff there {:.4}",
                    steps[i]["gap"].as_f64().unwrap(),
                    diffs[i]
                ),
            }
        );
        match split {
            None => assert_eq!(got.len(), want.len()),
            Some(i) => {
                let gap = steps[i]["gap"].as_f64().unwrap() as f32;
                assert!(
                    gap <= 2.0 * diffs[i],
                    "{asset}: split at step {i}: gap {gap} is not explained by a logit difference of {}",
                    diffs[i]
                );
            }
        }
    }
}

#[test]
fn quantized_greedy_matches_llamacpp_smollm2() {
    check_greedy("smollm2-135m");
}

#[test]
fn quantized_greedy_matches_llamacpp_gemma3() {
    check_greedy("gemma3-270m");
}

/// The differentiable mode (every weight a trainable `Var`, so every op takes its backward-
/// capable form, attention within the step) gives the f32 inference path's logits: within 1e-4
/// on the logits the transformers comparison reads (top-20 and 64 sampled ids at the fixture's
/// positions; the long prompt passes Gemma 3's sliding window), where each path is ~3e-5 from
/// transformers. Over the whole vocabulary at every position (29M logits for 600 tokens) f32
/// rounding of two different summation orders reaches 1.7e-4 (logits of magnitude ~30, so
/// ~6e-6 relative); bounded here at 5e-4.
fn check_differentiable(asset: &str) {
    let f = open(asset);
    let exact = Model::load(&f, WeightMode::F32).unwrap();
    let train = Model::load_with(
        &f,
        recompose_llm::LoadOptions {
            mode: WeightMode::F32,
            trainable: recompose_llm::Trainable::All,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(train.params().len() > 100);
    let fx = fixture(&format!("logits_{asset}.json"));
    let mut cases: Vec<&Value> = fx["prompts"].as_array().unwrap().iter().collect();
    cases.push(&fx["long_prompt"]);
    let mut worst = 0f32;
    for case in cases {
        let tokens = ids(&case["ids"]);
        let mut cache = exact.new_cache(1);
        let (tk, step) = step_for(&[tokens.clone()], &cache, 0);
        let want = exact.forward(&tk, &step, &mut cache, Logits::All).unwrap();
        let targets = vec![recompose_llm::grad::IGNORE; tokens.len()];
        let batch = recompose_llm::Batch::from_rows(&[(tokens.clone(), targets)], 0).unwrap();
        let got = train.forward_train(&batch, &recompose_llm::Plan::default()).unwrap().logits;
        assert!(got.track_op(), "the differentiable forward must build a graph");
        let d = (got.detach() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Against transformers too (the fixture's top-20 and sampled ids).
        let sample_ids = ids(&fx["sample_ids"]);
        let rows: Vec<Vec<f32>> = got.detach().squeeze(0).unwrap().to_vec2().unwrap();
        let wrows: Vec<Vec<f32>> = want.squeeze(0).unwrap().to_vec2().unwrap();
        let (mut on_ids, mut vs_hf, mut inf_hf) = (0f32, 0f32, 0f32);
        for p in case["positions"].as_array().unwrap() {
            let pos = p["pos"].as_u64().unwrap() as usize;
            let top = p["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pair| (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32));
            let sampled = sample_ids
                .iter()
                .zip(p["sample"].as_array().unwrap())
                .map(|(id, v)| (*id as usize, v.as_f64().unwrap() as f32));
            for (id, v) in top.chain(sampled) {
                on_ids = on_ids.max((rows[pos][id] - wrows[pos][id]).abs());
                vs_hf = vs_hf.max((rows[pos][id] - v).abs());
                inf_hf = inf_hf.max((wrows[pos][id] - v).abs());
            }
        }
        eprintln!(
            "{asset}: {} tokens, max |differentiable - inference| {on_ids:.2e} on the fixture's ids, {d:.2e} over all; \
             vs transformers: differentiable {vs_hf:.2e}, inference {inf_hf:.2e}",
            tokens.len()
        );
        assert!(
            on_ids <= 1e-4,
            "{asset}: differentiable logits differ from inference by {on_ids} on the fixture's ids"
        );
        worst = worst.max(d);
    }
    assert!(worst <= 5e-4, "{asset}: differentiable logits differ from inference by {worst}");
}

#[test]
fn differentiable_logits_match_inference_smollm2() {
    check_differentiable("smollm2-135m");
}

#[test]
fn differentiable_logits_match_inference_gemma3() {
    check_differentiable("gemma3-270m");
}
