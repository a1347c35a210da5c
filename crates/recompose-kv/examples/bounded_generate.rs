//! Generates with a bounded KV cache from the library API and prints what it kept.
//!
//!     cargo run --release -p recompose-kv --example bounded_generate -- "h2o:0.2" "Once upon a time"

use recompose_core::weights::ModelFile;
use recompose_kv::KvSpec;
use recompose_llm::generate::{generate, GenerateOptions};
use recompose_llm::{Model, WeightMode};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let spec: KvSpec = args.next().unwrap_or_else(|| "h2o:0.5".into()).parse()?;
    let prompt = args.next().unwrap_or_else(|| "The quick brown fox jumps over the lazy dog. ".repeat(20));
    let file = ModelFile::open(recompose_assets::main_file("smollm2-135m")?)?;
    let tok = file.tokenizer()?;
    let model = Model::load(&file, WeightMode::Quantized)?;
    let ids = tok.encode(&prompt, true)?;
    // Fractional budgets resolve against each row's prompt length.
    let layout = model.cache_layout();
    let opts = GenerateOptions { max_tokens: 40, ..Default::default() };
    let (gens, _) =
        generate(&model, &tok, std::slice::from_ref(&ids), &opts, |n| spec.build(&layout, &[n]), |_, _| {})?;
    println!("{}", gens[0].text);
    println!("---\n{} ({} prompt tokens): {} KV bytes held", spec, ids.len(), gens[0].kv_bytes);
    Ok(())
}
