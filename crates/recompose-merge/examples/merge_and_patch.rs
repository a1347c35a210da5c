//! Merge two models with TIES from a mergekit YAML, then take a task vector from the merge and
//! add it to, and remove it from, the base — all through the library API.
//!
//!     cargo run --release -p recompose-merge --example merge_and_patch -- BASE FINETUNED_A FINETUNED_B OUT_DIR
//!
//! Any of the inputs may be a .gguf file, an HF folder or an asset name (smollm2-135m). Without
//! arguments it builds three tiny random models in a temporary folder and uses those.

use recompose_merge::delta::{patch, Delta, Scheme};
use recompose_merge::merge::{merge, MergeOptions};
use recompose_merge::output::Format;
use recompose_merge::signature::extract_task_vector;
use recompose_merge::{MergeConfig, Store};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir()?;
    let (base, a, b, out) = if args.len() == 4 {
        (args[0].clone(), args[1].clone(), args[2].clone(), PathBuf::from(&args[3]))
    } else {
        let mk = |name: &str, seed| -> Result<String, Box<dyn std::error::Error>> {
            let p = tmp.path().join(format!("{name}.gguf"));
            let spec = recompose_core::testing::TinySpec { seed, ..Default::default() };
            recompose_core::testing::write_tiny_gguf(&p, &spec)?;
            Ok(p.display().to_string())
        };
        (mk("base", 1)?, mk("a", 2)?, mk("b", 3)?, tmp.path().join("out"))
    };
    std::fs::create_dir_all(&out)?;

    // 1. TIES, exactly as mergekit reads it.
    let yaml = format!(
        "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: [1.0, 0.3]}}\ndtype: float32\n"
    );
    let merged = out.join("ties");
    let s = merge(&MergeConfig::parse(&yaml)?, &merged, &MergeOptions::default(), &|_, _| {})?;
    println!("merged {} tensors over {} layers into {}", s.tensors, s.layers, merged.display());

    // 2. The merge's task vector against the base, at 16 levels (4 bits).
    let (sb, sm) = (Store::open(&base)?, Store::open(merged.to_str().unwrap_or_default())?);
    let tv = out.join("ties.tv.safetensors");
    let e = extract_task_vector(&sb, &sm, &[], Some(16), Scheme::Linear, &tv, &|_, _| {})?;
    println!("task vector: {} bytes for {} tensors ({} for a full copy)", e.bytes, e.tensors, e.full_bytes);

    // 3. Half of it added to the base, then removed again.
    let half = out.join("base+half");
    patch(&sb, &[(Delta::open(&tv)?, 0.5)], false, &half, Format::Safetensors, None, &|_, _| {})?;
    let back = out.join("base-again");
    let sh = Store::open(half.to_str().unwrap_or_default())?;
    patch(&sh, &[(Delta::open(&tv)?, 0.5)], true, &back, Format::Safetensors, None, &|_, _| {})?;
    let sback = Store::open(back.to_str().unwrap_or_default())?;
    let (mut same, mut total) = (0usize, 0usize);
    for n in sb.names() {
        let (x, y) = (sb.load(n)?, sback.load(n)?);
        same += x.iter().zip(&y).filter(|(p, q)| p.to_bits() == q.to_bits()).count();
        total += x.len();
    }
    println!("apply then remove: {same}/{total} weights bit-exact (the rest within one rounding)");
    Ok(())
}
