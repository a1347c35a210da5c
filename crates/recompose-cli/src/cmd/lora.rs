//! `recompose lora merge`: fold a PEFT LoRA adapter into a model's weights.

use super::delta::PatchOut;
use anyhow::{Context, Result};
use recompose_merge::Store;
use std::path::Path;

#[derive(clap::Subcommand, Debug)]
pub enum LoraCommand {
    /// MODEL + scale * B A for every adapted module, written as a model (HF folder or GGUF).
    Merge {
        /// The base model (asset name, .gguf or HF folder) the adapter was trained on.
        model: String,
        /// The PEFT adapter folder, optionally ADAPTER:SCALE.
        adapter: String,
        #[command(flatten)]
        out: PatchOut,
    },
}

pub fn run(c: LoraCommand, quiet: bool) -> Result<()> {
    match c {
        LoraCommand::Merge { model, adapter, out } => {
            let (path, scale) = recompose_core::peft::parse_scaled(&adapter).map_err(anyhow::Error::msg)?;
            let mut store = Store::open(&model).with_context(|| format!("opening {model}"))?;
            if !recompose_core::peft::is_adapter(Path::new(&path)) {
                anyhow::bail!("{}: not a PEFT adapter folder (no adapter_config.json)", path.display());
            }
            let a = recompose_core::peft::Adapter::open(&path)?;
            if let Some(f) = store.model_file() {
                a.check_base(f)?;
            }
            store.attach(a, scale as f32)?;
            out.write(&store, &[], false, quiet)
        }
    }
}
