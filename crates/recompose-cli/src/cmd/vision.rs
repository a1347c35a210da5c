//! `recompose vision`: train, evaluate and corrupt robust (MoE) CNNs.

use crate::common::progress;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args as ClapArgs, Subcommand};
use recompose_vision::attack::Attack;
use recompose_vision::corrupt::{corrupt_dataset, Corruption};
use recompose_vision::data::{self, Dataset, Split};
use recompose_vision::model::{Arch, Model, ModelConfig};
use recompose_vision::train::{self, EpochLog, Method, OptState, TrainConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum VisionCommand {
    /// Train a dense or MoE CNN (standard, pgd-at, trades, advmoe); resumable safetensors checkpoints.
    Train(TrainArgs),
    /// Accuracy of a checkpoint: clean, under an attack (fgsm, pgdK), and/or on a corruption.
    Eval(EvalArgs),
    /// Write a corrupted copy of a data set split (CIFAR-10-C style) as a safetensors data file.
    Corrupt(CorruptArgs),
}

#[derive(ClapArgs, Debug)]
pub struct TrainArgs {
    /// Data set: fashion-mnist, cifar10, or a data file from `vision corrupt`.
    #[arg(long)]
    data: String,
    /// Network: resnet or vgg.
    #[arg(long, default_value = "vgg")]
    arch: String,
    /// Channels of the first stage (later stages 2x, 4x); divisible by --experts.
    #[arg(long, default_value_t = 16)]
    width: usize,
    /// Experts per MoE conv (1 = dense).
    #[arg(long, default_value_t = 1)]
    experts: usize,
    /// Hidden channels of each router's conv.
    #[arg(long, default_value_t = 8)]
    router_width: usize,
    /// standard, pgd-at, trades or advmoe.
    #[arg(long, default_value = "standard")]
    method: String,
    /// Epochs in total; may be raised on --resume (the cosine schedule then spans the new total).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per SGD step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Peak learning rate (SGD, cosine decay to 0).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// L2 weight decay on conv and linear weights.
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// TRADES/AdvMoE robustness weight.
    #[arg(long, default_value_t = 6.0)]
    beta: f64,
    /// Weight of the routers' load-balancing loss (MoE only).
    #[arg(long, default_value_t = 0.1)]
    balance: f64,
    /// L-inf radius in pixel units, e.g. 8/255 (default: 8/255 for CIFAR-10, 0.1 for Fashion-MNIST).
    #[arg(long)]
    eps: Option<String>,
    /// PGD steps when generating training examples.
    #[arg(long, default_value_t = 2)]
    train_steps: usize,
    /// Step of the training attack (default 5/8 of eps: 5/255 at 8/255).
    #[arg(long)]
    train_step_size: Option<String>,
    /// Attack of the per-epoch held-out check (eval step: eps/4).
    #[arg(long, default_value = "pgd10")]
    check_attack: String,
    /// Train on a corrupted copy: NAME:SEVERITY (e.g. gaussian_noise:3), fixed per image.
    #[arg(long)]
    corruption: Option<String>,
    /// Use only this many training images per class (quick runs, equal budgets across data sets).
    #[arg(long)]
    per_class: Option<usize>,
    /// Start from this checkpoint's weights (fine-tuning); the architecture comes from it.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue an interrupted run from OUT and OUT's .state file.
    #[arg(long)]
    resume: bool,
    /// Seed of the initialisation, data order, augmentation and attacks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint (.safetensors), rewritten after every epoch; the optimiser state goes
    /// beside it (.state.safetensors) and the epoch log to .log.jsonl.
    #[arg(short, long)]
    out: PathBuf,
}

#[derive(ClapArgs, Debug)]
pub struct EvalArgs {
    /// Checkpoint written by `vision train` (or patched by `rws apply` / `tv apply`).
    checkpoint: PathBuf,
    /// Data set whose test split to use: fashion-mnist, cifar10, or a data file.
    #[arg(long)]
    data: String,
    /// none, fgsm or pgdK (e.g. pgd10).
    #[arg(long, default_value = "none")]
    attack: String,
    /// L-inf radius (default 8/255 for CIFAR-10, 0.1 for Fashion-MNIST).
    #[arg(long)]
    eps: Option<String>,
    /// PGD step (default eps/4: 2/255 at 8/255).
    #[arg(long)]
    step: Option<String>,
    /// Evaluate on a corruption: NAME:SEVERITY, NAME (all severities), or `all`.
    #[arg(long)]
    corruption: Option<String>,
    /// Re-estimate batch-norm statistics on this many training batches first (after a patch).
    #[arg(long, default_value_t = 0)]
    recalibrate_bn: usize,
    /// Evaluate only the first N test images (the splits are in a seeded mixed order).
    #[arg(long)]
    limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
pub struct CorruptArgs {
    /// Data set: fashion-mnist, cifar10, or a data file.
    #[arg(long)]
    data: String,
    /// train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// gaussian_noise, shot_noise, impulse_noise, gaussian_blur, contrast, brightness, pixelate, jpeg.
    #[arg(long)]
    corruption: String,
    /// 1 (mild) to 5 (severe).
    #[arg(long, default_value_t = 3)]
    severity: u8,
    /// Seed of the random corruptions (noise); each image draws from (seed, index).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output data file (.safetensors).
    #[arg(short, long)]
    out: PathBuf,
    /// Also write the first 16 images, clean above corrupted, as a PPM picture.
    #[arg(long)]
    preview: Option<PathBuf>,
}

pub fn run(cmd: VisionCommand, quiet: bool) -> Result<()> {
    match cmd {
        VisionCommand::Train(a) => train_cmd(a, quiet),
        VisionCommand::Eval(a) => eval_cmd(a, quiet),
        VisionCommand::Corrupt(a) => corrupt_cmd(a),
    }
}

/// `8/255`, `0.1`.
fn parse_fraction(s: &str) -> Result<f64> {
    let v = match s.split_once('/') {
        Some((a, b)) => a.trim().parse::<f64>().ok().zip(b.trim().parse::<f64>().ok()).map(|(a, b)| a / b),
        None => s.trim().parse::<f64>().ok(),
    };
    match v {
        Some(v) if v.is_finite() && (0.0..=1.0).contains(&v) => Ok(v),
        _ => bail!("'{s}' is not a pixel amount in [0, 1] (write 8/255 or 0.03)"),
    }
}

fn default_eps(ds: &Dataset) -> f64 {
    if ds.channels == 1 {
        0.1
    } else {
        8.0 / 255.0
    }
}

/// `NAME:SEV` → one pair; `NAME` → severities 1..5; `all` → every corruption at 1..5.
fn parse_corruptions(s: &str) -> Result<Vec<(Corruption, u8)>> {
    if s == "all" {
        return Ok(Corruption::ALL.iter().flat_map(|c| (1..=5).map(move |v| (*c, v))).collect());
    }
    let (name, sev) = match s.split_once(':') {
        Some((n, v)) => (
            n,
            Some(
                v.parse::<u8>()
                    .ok()
                    .filter(|v| (1..=5).contains(v))
                    .with_context(|| format!("severity '{v}' must be 1..5"))?,
            ),
        ),
        None => (s, None),
    };
    let c: Corruption = name.parse()?;
    Ok(match sev {
        Some(v) => vec![(c, v)],
        None => (1..=5).map(|v| (c, v)).collect(),
    })
}

fn train_cmd(a: TrainArgs, quiet: bool) -> Result<()> {
    let state_path = sibling(&a.out, "state.safetensors");
    let log_path = sibling(&a.out, "log.jsonl");
    if !a.resume && a.out.exists() {
        bail!("{} exists; pass --resume to continue that run or choose another --out", a.out.display());
    }
    // Fail now rather than after the first epoch's work.
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        bail!("{}: the folder {} does not exist", a.out.display(), dir.display());
    }
    let mut data = data::open(&a.data, Split::Train)?;
    let test = data::open(&a.data, Split::Test).or_else(|_| data::open(&a.data, Split::Train))?;
    if let Some(n) = a.per_class {
        data = data.take_per_class(n, a.seed);
    }
    if let Some(c) = &a.corruption {
        let list = parse_corruptions(c)?;
        let [(c, v)] = list[..] else { bail!("--corruption for training takes one NAME:SEVERITY") };
        data = corrupt_dataset(&data, c, v, a.seed)?;
    }
    // A fixed held-out batch for the per-epoch log line (same corruption as training when given).
    let mut held = test.subset(&(0..test.len().min(256)).collect::<Vec<_>>());
    if let Some(c) = &a.corruption {
        let (c, v) = parse_corruptions(c)?[0];
        held = corrupt_dataset(&held, c, v, a.seed ^ 1)?;
    }
    let eps = a.eps.as_deref().map(parse_fraction).transpose()?.unwrap_or_else(|| default_eps(&data));
    let train_step = a.train_step_size.as_deref().map(parse_fraction).transpose()?.unwrap_or(eps * 0.625);
    let cfg = TrainConfig {
        method: a.method.parse::<Method>()?,
        epochs: a.epochs,
        batch_size: a.batch,
        lr: a.lr,
        momentum: 0.9,
        weight_decay: a.weight_decay,
        beta: a.beta,
        train_attack: Attack::pgd(eps, train_step.max(1e-9), a.train_steps.max(1)),
        eval_attack: Attack::parse(&a.check_attack, eps, (eps / 4.0).max(1e-9))?.unwrap_or(Attack::fgsm(0.0)),
        seed: a.seed,
        limit: a.per_class,
        balance: a.balance,
    };
    let (model, mut state) = if a.resume {
        let (model, meta) = Model::load(&a.out, DType::F32)?;
        let saved: TrainConfig = serde_json::from_str(meta.get(TRAIN_KEY).map(String::as_str).unwrap_or("null"))
            .with_context(|| format!("{}: no training config to resume from", a.out.display()))?;
        if (TrainConfig { epochs: cfg.epochs, ..saved.clone() }) != cfg {
            bail!("--resume with different training options than {} was started with", a.out.display());
        }
        let state = load_state(&state_path, &model, &cfg)?;
        eprintln!("resuming {} after epoch {}", a.out.display(), state.epoch);
        (model, state)
    } else {
        let model = match &a.init {
            Some(p) => Model::load(p, DType::F32)?.0,
            None => {
                let (mean, std) = data.mean_std();
                let config = ModelConfig {
                    arch: a.arch.parse::<Arch>()?,
                    width: a.width,
                    experts: a.experts,
                    router_width: a.router_width,
                    in_channels: data.channels,
                    image_size: data.height,
                    classes: data.classes.len().max(2),
                    mean,
                    std,
                };
                Model::new(config, a.seed, DType::F32)?
            }
        };
        let state = OptState::new(&model, &cfg)?;
        (model, state)
    };
    cfg.validate(&model)?;
    let dense_macs = Model::new(ModelConfig { experts: 1, ..model.config.clone() }, 0, DType::F32)?.macs();
    eprintln!(
        "training {:?} width {} experts {} ({:.2} M multiply-adds per image, dense {:.2} M) on {} {} images, method {:?}",
        model.config.arch,
        model.config.width,
        model.config.experts,
        model.macs() as f64 / 1e6,
        dense_macs as f64 / 1e6,
        data.len(),
        data.name,
        cfg.method
    );
    let pb = progress((data.len() / cfg.batch_size * cfg.batch_size) as u64, "epoch", quiet);
    let mut obs =
        Saver { out: &a.out, state_path: &state_path, log_path: &log_path, cfg: &cfg, pb: &pb, epochs: cfg.epochs };
    pb.set_message(format!("epoch {}/{}", state.epoch + 1, cfg.epochs));
    train::train(&model, &mut state, &data, &held, &cfg, &mut obs)?;
    pb.finish_and_clear();
    Ok(())
}

const TRAIN_KEY: &str = "recompose.vision.train";

struct Saver<'a> {
    out: &'a Path,
    state_path: &'a Path,
    log_path: &'a Path,
    cfg: &'a TrainConfig,
    pb: &'a indicatif::ProgressBar,
    epochs: usize,
}

impl train::Observer for Saver<'_> {
    fn batch(&mut self, images: usize) {
        self.pb.inc(images as u64);
    }
    fn epoch(&mut self, log: &EpochLog, model: &Model, state: &OptState) -> recompose_vision::Result<()> {
        let cfg = serde_json::to_string(self.cfg).unwrap_or_default();
        // State first: a crash between the two writes leaves a state one epoch ahead, which
        // --resume detects as a mismatch rather than silently replaying an epoch.
        save_state(self.state_path, model, state)?;
        model.save(self.out, &[(TRAIN_KEY, cfg), ("recompose.vision.epoch", state.epoch.to_string())])?;
        let line = serde_json::to_string(log).unwrap_or_default();
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path) {
            let _ = writeln!(f, "{line}");
        }
        self.pb.suspend(|| eprintln!("{log}"));
        self.pb.reset();
        self.pb.set_message(format!("epoch {}/{}", state.epoch + 1, self.epochs));
        Ok(())
    }
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// The optimiser state as a recompose-train checkpoint (parameters, momentum, epoch).
fn save_state(path: &Path, model: &Model, state: &OptState) -> recompose_vision::Result<()> {
    recompose_train::checkpoint::save(path, &model.params, &state.opt, &serde_json::json!({ "epoch": state.epoch }))
        .map_err(recompose_vision::train::train_err)
}

fn load_state(path: &Path, model: &Model, cfg: &TrainConfig) -> Result<OptState> {
    let ck = recompose_train::checkpoint::Loaded::open(path)?;
    let epoch = ck.state(path)?["epoch"]
        .as_u64()
        .with_context(|| format!("{}: no epoch in the optimiser state", path.display()))? as usize;
    let mut state = OptState::new(model, cfg)?;
    ck.restore(path, &model.params, &mut state.opt)?;
    state.epoch = epoch;
    Ok(state)
}

#[derive(serde::Serialize)]
struct EvalRow {
    corruption: String,
    severity: u8,
    images: usize,
    clean_acc: f64,
    robust_acc: Option<f64>,
}

fn eval_cmd(a: EvalArgs, quiet: bool) -> Result<()> {
    let (model, _) = Model::load(&a.checkpoint, DType::F32)?;
    let mut test = data::open(&a.data, Split::Test)?;
    if let Some(n) = a.limit {
        test = test.subset(&(0..n.min(test.len())).collect::<Vec<_>>());
    }
    if test.channels != model.config.in_channels || test.height != model.config.image_size {
        bail!(
            "{} holds {}x{}x{} images; the model takes {}x{}x{}",
            a.data,
            test.channels,
            test.height,
            test.width,
            model.config.in_channels,
            model.config.image_size,
            model.config.image_size
        );
    }
    if a.recalibrate_bn > 0 {
        let train_set = data::open(&a.data, Split::Train)?;
        train::recalibrate_bn(&model, &train_set, a.recalibrate_bn, 128, 0)?;
    }
    let eps = a.eps.as_deref().map(parse_fraction).transpose()?.unwrap_or_else(|| default_eps(&test));
    let step = a.step.as_deref().map(parse_fraction).transpose()?.unwrap_or(eps / 4.0);
    let attack = Attack::parse(&a.attack, eps, step.max(1e-9))?;
    let sets: Vec<(String, u8, Dataset)> = match &a.corruption {
        None => vec![("none".into(), 0, test)],
        Some(s) => parse_corruptions(s)?
            .into_iter()
            .map(|(c, v)| Ok((c.to_string(), v, corrupt_dataset(&test, c, v, 0)?)))
            .collect::<Result<_>>()?,
    };
    println!(
        "{}: {:.2} M multiply-adds per image, attack {}{}",
        a.checkpoint.display(),
        model.macs() as f64 / 1e6,
        a.attack,
        attack.map(|x| format!(" (eps {:.4}, step {:.4}, {} steps)", x.eps, x.step, x.steps)).unwrap_or_default()
    );
    let mut rows = vec![];
    for (name, sev, ds) in sets {
        let pb = progress(ds.len() as u64, &format!("eval {name}"), quiet);
        let r = train::evaluate(&model, &ds, attack.as_ref(), a.batch, |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        let robust = r.robust_acc.map(|x| format!("  robust {:.2}%", 100.0 * x)).unwrap_or_default();
        let what = if sev == 0 { "clean data".to_string() } else { format!("{name} s{sev}") };
        println!("{what:<22} images {:>5}  accuracy {:.2}%{robust}", r.images, 100.0 * r.clean_acc);
        rows.push(EvalRow {
            corruption: name,
            severity: sev,
            images: r.images,
            clean_acc: r.clean_acc,
            robust_acc: r.robust_acc,
        });
    }
    if let Some(p) = &a.json {
        let body = serde_json::json!({ "checkpoint": a.checkpoint, "macs": model.macs(), "attack": a.attack, "eps": eps, "step": step, "results": rows });
        recompose_core::atomic::write_bytes(p, serde_json::to_string_pretty(&body)?.as_bytes())?;
    }
    Ok(())
}

fn corrupt_cmd(a: CorruptArgs) -> Result<()> {
    let split: Split = a.split.parse()?;
    let ds = data::open(&a.data, split)?;
    let c: Corruption = a.corruption.parse()?;
    let out = corrupt_dataset(&ds, c, a.severity, a.seed)?;
    data::save_file(&out, &a.out)?;
    if let Some(p) = &a.preview {
        write_preview(&ds, &out, p)?;
    }
    let diff: f64 = ds.images.iter().zip(&out.images).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
        / ds.images.len().max(1) as f64;
    println!(
        "{} images, {c} severity {}: mean |change| {:.4} per pixel -> {}",
        out.len(),
        a.severity,
        diff,
        a.out.display()
    );
    Ok(())
}

/// 16 images side by side, clean row above corrupted row, as binary PPM.
fn write_preview(clean: &Dataset, bad: &Dataset, path: &Path) -> Result<()> {
    let n = clean.len().min(16);
    let (h, w, c) = (clean.height, clean.width, clean.channels);
    let mut px = vec![0u8; 2 * h * n * w * 3];
    for (row, ds) in [clean, bad].into_iter().enumerate() {
        for i in 0..n {
            let img = ds.image(i);
            for y in 0..h {
                for x in 0..w {
                    for k in 0..3 {
                        let v = img[(k.min(c - 1) * h + y) * w + x];
                        px[((row * h + y) * n * w + i * w + x) * 3 + k] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    let mut bytes = format!("P6\n{} {}\n255\n", n * w, 2 * h).into_bytes();
    bytes.extend(px);
    recompose_core::atomic::write_bytes(path, &bytes)?;
    Ok(())
}
