//! `recompose merge`: a mergekit YAML config in, a merged model out.

use crate::common::progress;
use anyhow::{Context, Result};
use recompose_core::convert::OutDType;
use recompose_merge::merge::{merge, MergeOptions};
use recompose_merge::output::Format;
use recompose_merge::MergeConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// mergekit YAML config (models: or slices:, merge_method, base_model, parameters, ...).
    config: PathBuf,
    /// Output: a folder to create (HF safetensors), or a .gguf file with --format gguf.
    output: PathBuf,
    /// Output format: hf (safetensors folder, loads in HF transformers) or gguf.
    #[arg(long, default_value = "hf", value_parser = ["hf", "gguf"])]
    format: String,
    /// GGUF tensor type: f32, f16, q8_0, q4_k (only with --format gguf).
    #[arg(long, default_value = "f16")]
    quant: OutDType,
    /// Seed of the random methods (dare_*, della*): same seed, same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest safetensors shard, in MB.
    #[arg(long, default_value_t = 5000, value_name = "MB")]
    shard_mb: usize,
    /// Memory for tensors merged at once (inputs + output), in MB; more merges more in parallel.
    #[arg(long, default_value_t = 256, value_name = "MB")]
    memory_mb: usize,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let cfg = MergeConfig::from_file(&a.config)?;
    let format = match a.format.as_str() {
        "gguf" => Format::Gguf(a.quant),
        _ => Format::Safetensors,
    };
    if a.shard_mb == 0 || a.memory_mb == 0 {
        anyhow::bail!("--shard-mb and --memory-mb must be at least 1");
    }
    let opts =
        MergeOptions { format, seed: a.seed, shard_bytes: a.shard_mb * 1_000_000, budget_bytes: a.memory_mb << 20 };
    let pb = progress(0, "merging", quiet);
    let t0 = std::time::Instant::now();
    let s = merge(&cfg, &a.output, &opts, &|d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    })
    .with_context(|| format!("merging {}", a.config.display()))?;
    pb.finish_and_clear();
    let vocab = s.vocab.map(|v| format!(", vocabulary {v}")).unwrap_or_default();
    eprintln!(
        "wrote {} ({} tensors, {} layers{vocab}) in {:.1}s",
        a.output.display(),
        s.tensors,
        s.layers,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
