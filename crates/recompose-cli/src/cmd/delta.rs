//! `recompose tv ...` (task vectors) and `recompose rws ...` (robust weight signatures).

use crate::common::progress;
use anyhow::{Context, Result};
use recompose_core::convert::OutDType;
use recompose_merge::delta::{patch, Delta, Scheme};
use recompose_merge::output::Format;
use recompose_merge::signature;
use recompose_merge::Store;
use std::path::{Path, PathBuf};

/// Where a patched model goes.
#[derive(clap::Args, Debug)]
pub struct PatchOut {
    /// Output: a folder (HF safetensors), a .safetensors file (bare checkpoints), or a .gguf file.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Output dtype: f32, f16, bf16; for .gguf also q8_0, q4_k. Default: the model's own dtype.
    #[arg(long)]
    pub dtype: Option<OutDType>,
}

impl PatchOut {
    /// The output format and safetensors dtype the flags ask for.
    pub fn format(&self) -> Result<(Format, Option<candle_core::DType>)> {
        let format = if self.output.extension().is_some_and(|e| e == "gguf") {
            Format::Gguf(self.dtype.unwrap_or(OutDType::F32))
        } else {
            Format::Safetensors
        };
        let dtype = match self.dtype {
            None => None,
            Some(OutDType::F32) => Some(candle_core::DType::F32),
            Some(OutDType::F16) => Some(candle_core::DType::F16),
            Some(OutDType::BF16) => Some(candle_core::DType::BF16),
            Some(_) if format != Format::Safetensors => None,
            Some(q) => anyhow::bail!("--dtype {q:?}: quantised types need a .gguf output"),
        };
        Ok((format, dtype))
    }

    /// Writes `m` + the deltas (or minus, to remove) with a progress bar.
    pub fn write(&self, m: &Store, deltas: &[(Delta, f32)], remove: bool, quiet: bool) -> Result<()> {
        let (format, dtype) = self.format()?;
        let pb = progress(0, if remove { "removing" } else { "applying" }, quiet);
        let notes = patch(m, deltas, remove, &self.output, format, dtype, &|d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        })?;
        pb.finish_and_clear();
        for n in notes {
            tracing::warn!("{n}");
        }
        eprintln!("wrote {}", self.output.display());
        Ok(())
    }
}

/// How an extracted delta is stored.
#[derive(clap::Args, Debug)]
pub struct Quant {
    /// Quantise each tensor to N uniform levels (2..256; 16 = 4 bits, packed two per byte).
    #[arg(long)]
    levels: Option<u32>,
    /// Quantisation grid: linear in the value, or log (sign + log-magnitude).
    #[arg(long, default_value = "linear")]
    scheme: Scheme,
}

#[derive(clap::Subcommand, Debug)]
pub enum TvCommand {
    /// Task vector = finetuned - base, saved as safetensors (f32, or quantised with --levels).
    Extract {
        /// The model the fine-tune started from.
        #[arg(long)]
        base: String,
        /// The fine-tuned model.
        #[arg(long)]
        finetuned: String,
        /// Keep only tensors whose name contains this text (repeatable; default: all tensors).
        #[arg(long)]
        filter: Vec<String>,
        #[command(flatten)]
        quant: Quant,
        /// The task vector file to write (.safetensors).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// MODEL + sum(scale * vector); a negative scale negates a task (forgetting).
    Apply(Patch),
    /// MODEL - sum(scale * vector): undoes `apply` with the same vectors and scales.
    Remove(Patch),
}

/// A model and the deltas to add to it or take from it.
#[derive(clap::Args, Debug)]
pub struct Patch {
    /// The model to patch (asset name, .gguf, HF folder or .safetensors checkpoint).
    model: String,
    /// Deltas, each FILE or FILE:SCALE (a signature's scale is its alpha).
    #[arg(required = true)]
    deltas: Vec<String>,
    /// Scale of the deltas given without one (rws: alpha); negative to subtract (`--scale -1`).
    #[arg(long, visible_alias = "alpha", default_value_t = 1.0, allow_negative_numbers = true)]
    scale: f32,
    #[command(flatten)]
    out: PatchOut,
}

#[derive(clap::Subcommand, Debug)]
pub enum RwsCommand {
    /// Signature = (robust - pretrained) minus its projection on (clean - pretrained), first K layers.
    Extract {
        /// The common initialisation of the clean and robust models.
        #[arg(long)]
        pretrained: String,
        /// The model fine-tuned on clean data.
        #[arg(long)]
        clean: String,
        /// Model(s) fine-tuned for robustness (one signature each; repeatable).
        #[arg(long, required = true)]
        robust: Vec<String>,
        /// Layers to keep: first:K (in the checkpoint's order) or all.
        #[arg(long, default_value = "all")]
        layers: String,
        #[command(flatten)]
        quant: Quant,
        /// Output file (one robust model) or folder (several: NAME.rws.safetensors each).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// MODEL + sum(alpha * signature); signatures as FILE or FILE:ALPHA (--alpha for the rest).
    Apply(Patch),
    /// MODEL - sum(alpha * signature): removes an applied patch.
    Remove(Patch),
    /// Per-layer norms: of robust - clean (--clean/--robust), or of a signature file.
    Inspect {
        /// A signature file to describe.
        signature: Option<PathBuf>,
        #[arg(long)]
        clean: Option<String>,
        #[arg(long)]
        robust: Option<String>,
        /// Write the table as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn open(label: &str) -> Result<Store> {
    Store::open(label).with_context(|| format!("opening {label}"))
}

/// `FILE[:SCALE]`, the scale defaulting to `default`.
fn parse_scaled(s: &str, default: f32) -> Result<(Delta, f32)> {
    let (path, scale) = match s.rsplit_once(':') {
        Some((p, x)) if x.parse::<f32>().is_ok() => (p, x.parse::<f32>().unwrap_or(default)),
        _ => (s, default),
    };
    if !scale.is_finite() {
        anyhow::bail!("{s}: scale must be a finite number");
    }
    Ok((Delta::open(Path::new(path))?, scale))
}

fn do_patch(p: &Patch, remove: bool, quiet: bool, kind: &str) -> Result<()> {
    let (m, out) = (open(&p.model)?, &p.out);
    let deltas: Vec<(Delta, f32)> = p.deltas.iter().map(|s| parse_scaled(s, p.scale)).collect::<Result<_>>()?;
    for (d, _) in &deltas {
        if d.kind() != kind {
            anyhow::bail!("{}: is a {} file, not a {kind}", d.path.display(), d.kind());
        }
    }
    out.write(&m, &deltas, remove, quiet)
}

fn mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

pub fn run_tv(c: TvCommand, quiet: bool) -> Result<()> {
    match c {
        TvCommand::Extract { base, finetuned, filter, quant, output } => {
            let (b, f) = (open(&base)?, open(&finetuned)?);
            let pb = progress(0, "extracting", quiet);
            let e = signature::extract_task_vector(&b, &f, &filter, quant.levels, quant.scheme, &output, &|d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            })?;
            pb.finish_and_clear();
            eprintln!(
                "wrote {} ({} tensors, {} vs {} for a full copy: {:.1}x smaller)",
                output.display(),
                e.tensors,
                mib(e.bytes),
                mib(e.full_bytes),
                e.full_bytes as f64 / e.bytes.max(1) as f64
            );
            Ok(())
        }
        TvCommand::Apply(p) => do_patch(&p, false, quiet, "task_vector"),
        TvCommand::Remove(p) => do_patch(&p, true, quiet, "task_vector"),
    }
}

pub fn run_rws(c: RwsCommand, quiet: bool) -> Result<()> {
    match c {
        RwsCommand::Extract { pretrained, clean, robust, layers, quant, output } => {
            let (p, c) = (open(&pretrained)?, open(&clean)?);
            if robust.len() > 1 {
                std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
            }
            for r in &robust {
                let rs = open(r)?;
                let target = if robust.len() > 1 {
                    let stem = Path::new(r).file_stem().map_or("robust".into(), |s| s.to_string_lossy().into_owned());
                    output.join(format!("{stem}.rws.safetensors"))
                } else {
                    output.clone()
                };
                let pb = progress(0, "extracting", quiet);
                let e = signature::extract_signature(
                    &p,
                    &c,
                    &rs,
                    &layers,
                    quant.levels,
                    quant.scheme,
                    &target,
                    &|d, t| {
                        pb.set_length(t as u64);
                        pb.set_position(d as u64);
                    },
                )?;
                pb.finish_and_clear();
                eprintln!(
                    "wrote {} ({} tensors, {} vs {} for a full copy: {:.1}x smaller)",
                    target.display(),
                    e.tensors,
                    mib(e.bytes),
                    mib(e.full_bytes),
                    e.full_bytes as f64 / e.bytes.max(1) as f64
                );
            }
            Ok(())
        }
        RwsCommand::Apply(p) => do_patch(&p, false, quiet, "rws"),
        RwsCommand::Remove(p) => do_patch(&p, true, quiet, "rws"),
        RwsCommand::Inspect { signature: Some(sig), clean: None, robust: None, json } => {
            let d = Delta::open(&sig)?;
            let rows = signature::delta_layers(&d)?;
            println!("{:<40} {:>10} {:>12}", "layer", "params", "norm");
            for (k, (n, norm)) in &rows {
                println!("{k:<40} {n:>10} {norm:>12.5}");
            }
            let params: usize = rows.values().map(|v| v.0).sum();
            println!(
                "{} layers, {params} parameters, {} stored ({}), f32 copy of those layers {}",
                rows.len(),
                mib(d.data_bytes()),
                d.levels().map_or("f32".into(), |l| format!("{l} levels")),
                mib(params * 4)
            );
            for (k, v) in d.metadata.iter().filter(|(k, _)| k.as_str() != "recompose.quant") {
                println!("  {k}: {v}");
            }
            if let Some(j) = json {
                let v: Vec<_> =
                    rows.iter().map(|(k, (n, x))| serde_json::json!({"layer": k, "params": n, "norm": x})).collect();
                std::fs::write(&j, serde_json::to_string_pretty(&v)?)
                    .with_context(|| format!("writing {}", j.display()))?;
            }
            Ok(())
        }
        RwsCommand::Inspect { signature: None, clean: Some(c), robust: Some(r), json } => {
            let rows = signature::layer_deltas(&open(&c)?, &open(&r)?)?;
            println!("{:<40} {:>10} {:>12} {:>10}", "layer", "params", "|R-C|", "|R-C|/|C|");
            for x in &rows {
                println!("{:<40} {:>10} {:>12.5} {:>10.5}", x.layer, x.params, x.delta_norm, x.relative);
            }
            if let Some(j) = json {
                std::fs::write(&j, serde_json::to_string_pretty(&rows)?)
                    .with_context(|| format!("writing {}", j.display()))?;
            }
            Ok(())
        }
        RwsCommand::Inspect { .. } => anyhow::bail!("rws inspect: give a signature file, or --clean and --robust"),
    }
}
