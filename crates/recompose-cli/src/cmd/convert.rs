//! `recompose convert`: GGUF <-> HF safetensors, with an optional dtype change.

use crate::common::progress;
use anyhow::Result;
use recompose_core::convert::{self, OutDType};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input: a .gguf file or an HF safetensors folder (or an asset name).
    input: String,
    /// Output: a path ending in .gguf, or a folder to create for HF safetensors.
    output: PathBuf,
    /// Output dtype: f32, f16, bf16 (both formats), q8_0, q4_k (GGUF only). Default f32.
    #[arg(long)]
    dtype: Option<OutDType>,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let input = recompose_assets::resolve_model(&a.input)?;
    let pb = progress(0, "converting", quiet);
    convert::convert(&input, &a.output, a.dtype, &mut |d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
