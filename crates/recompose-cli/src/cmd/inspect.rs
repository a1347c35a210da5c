//! `recompose inspect`: architecture, hyper-parameters, tokenizer, metadata and tensors of a model.

use anyhow::Result;
use recompose_core::weights::{ModelFile, Source};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .gguf file, an HF safetensors folder, an asset name, or a MoE folder (`moefy`).
    file: String,
    /// List every tensor (name, dtype, shape, bytes).
    #[arg(long)]
    tensors: bool,
    /// Print everything as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = std::path::Path::new(&a.file);
    if recompose_moe::MoeConfig::is_moe(dir) {
        return moe(dir, a.json);
    }
    let path = recompose_assets::resolve_model(&a.file)?;
    let f = ModelFile::open(&path)?;
    let tok = f.tokenizer()?;
    let c = &f.config;
    let entries = f.tensor_entries();
    let total: usize = entries.iter().map(|e| e.bytes).sum();
    let params: usize = entries.iter().map(|e| e.shape.iter().product::<usize>()).sum();
    if a.json {
        let meta: serde_json::Map<String, serde_json::Value> = match &f.source {
            Source::Gguf(g) => g.metadata.iter().map(|(k, v)| (k.clone(), v.summary().into())).collect(),
            Source::Hf(_) => Default::default(),
        };
        let v = serde_json::json!({
            "path": path, "format": match f.source { Source::Gguf(_) => "gguf", Source::Hf(_) => "safetensors" },
            "config": format!("{c:?}"), "tokenizer": tok.describe(), "parameters": params, "bytes": total,
            "metadata": meta, "tensors": if a.tensors { serde_json::to_value(&entries)? } else { serde_json::Value::Null },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file          {}", path.display());
    println!(
        "format        {}",
        match f.source {
            Source::Gguf(ref g) => format!("GGUF v{}", g.version),
            Source::Hf(_) => "HF safetensors".into(),
        }
    );
    println!("architecture  {:?}", c.arch);
    println!(
        "parameters    {:.1} M in {} tensors, {:.1} MiB",
        params as f64 / 1e6,
        entries.len(),
        total as f64 / 1048576.0
    );
    println!(
        "layers        {}  hidden {}  ffn {}  vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    );
    println!("attention     {} heads, {} KV heads, head dim {}", c.num_heads, c.num_kv_heads, c.head_dim);
    if !c.layer_dims.is_empty() {
        // A pruned sub-network: say how each run of equal layers is sized.
        let mut runs: Vec<(usize, usize, recompose_core::config::LayerDims)> = vec![];
        for (l, d) in c.layer_dims.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.2 == *d => r.1 = l,
                _ => runs.push((l, l, *d)),
            }
        }
        for (a, b, d) in runs {
            println!("  layers {a}-{b}  ffn {}  {} heads, {} KV heads", d.intermediate, d.heads, d.kv_heads);
        }
    }
    println!("rope          theta {}  {:?}  {:?}", c.rope_theta, c.rope_style, c.rope_scaling);
    println!("context       {}", c.max_position);
    if let Some(w) = c.sliding_window {
        println!(
            "sliding       window {w}, every {}th layer global, local rope theta {}",
            c.sliding_pattern, c.rope_theta_local
        );
    }
    println!("norm eps      {}  activation {:?}  tied embeddings {}", c.rms_eps, c.activation, c.tie_embeddings);
    println!("tokenizer     {}", tok.describe());
    if let Source::Gguf(g) = &f.source {
        let mut by_type = std::collections::BTreeMap::<String, usize>::new();
        for t in g.tensors() {
            *by_type.entry(format!("{:?}", t.dtype)).or_default() += 1;
        }
        println!("tensor types  {}", by_type.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" "));
    }
    if a.tensors {
        println!();
        for e in &entries {
            println!("{:<48} {:<6} {:<16} {:>12}", e.name, e.dtype, format!("{:?}", e.shape), e.bytes);
        }
    }
    Ok(())
}

/// A MoE folder: what it was made from, its experts per layer, its router, what it holds.
fn moe(dir: &std::path::Path, json: bool) -> Result<()> {
    let c = recompose_moe::MoeConfig::read(dir)?;
    let s = &c.split;
    let files: Vec<(String, u64)> = ["config.json", "router.safetensors", "gates.safetensors", "experts.safetensors"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok().map(|m| (f.to_string(), m.len())))
        .collect();
    let report = s.report();
    if json {
        let v = serde_json::json!({
            "path": dir, "format": c.format, "base": c.base, "experts": s.names, "keep": s.keep,
            "channels": s.channels, "router": c.router, "layerwise": c.layerwise, "layers": report, "files": files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("MoE folder    {}", dir.display());
    println!("format        {}", c.format);
    println!("made from     {}", c.base);
    println!(
        "experts       {} ({}), keep {} of {} FFN channels per token",
        s.names.len(),
        s.names.join(", "),
        s.keep,
        s.channels
    );
    match c.router {
        Some(r) => println!("router        pre-gating, {} experts, MLP width {}", r.experts, r.ffn),
        None if c.layerwise => println!("router        layer-wise: one linear gate per layer over its FFN input"),
        None => println!("router        none (every kept channel is permanent: a pruned model)"),
    }
    let fine_tuned = files.iter().any(|(f, _)| f == "experts.safetensors");
    println!(
        "experts from  {}",
        if fine_tuned { "experts.safetensors (fine-tuned)" } else { "the base model's weights (cut at load)" }
    );
    let (pmin, pmax) = report.iter().fold((usize::MAX, 0), |(a, b), r| (a.min(r.permanent), b.max(r.permanent)));
    println!("permanent     {pmin}-{pmax} channels per layer over {} layers", report.len());
    for r in &report {
        let e: Vec<String> = r.experts.iter().map(usize::to_string).collect();
        println!(
            "  layer {:>3}  permanent {:>5}  experts {}  shared {}  dropped {}",
            r.layer,
            r.permanent,
            e.join("/"),
            r.shared,
            r.dropped
        );
    }
    for (f, b) in files {
        println!("file          {f} {:.2} MiB", b as f64 / 1048576.0);
    }
    Ok(())
}
