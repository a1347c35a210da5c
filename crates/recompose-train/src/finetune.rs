//! Fine-tuning a language model, LoRA or full: micro-batches of rows accumulated into each
//! optimiser step (the loss is normalised by the step's target tokens, so accumulating equals
//! one large batch), a learning-rate schedule, clipping, held-out perplexity every K steps, a
//! JSONL log, checkpoints that resume bit for bit, and a stop with the last good checkpoint kept
//! when the loss turns NaN or infinite. The result is a PEFT adapter or an HF model folder.

use crate::checkpoint::{self, Loaded};
use crate::data::{Dataset, Order};
use crate::optim::{accumulate, clip_grad_norm, Optimizer, OptimizerKind, Param};
use crate::schedule::Schedule;
use crate::{Error, Result};
use candle_core::{DType, Var};
use recompose_core::weights::ModelFile;
use recompose_llm::lora::{mix, LoraConfig};
use recompose_llm::{Batch, Model, Plan};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Lora(LoraConfig),
    Full,
}

#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    pub mode: Mode,
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub accum: usize,
    pub schedule: Schedule,
    pub optimizer: OptimizerKind,
    pub clip: Option<f64>,
    pub seed: u64,
    /// Held-out perplexity every this many steps (and after the last); 0: only after the last.
    pub eval_every: usize,
    /// Held-out rows scored per evaluation (the first ones; 0: all).
    pub eval_rows: usize,
    /// A checkpoint every this many steps (and after the last).
    pub checkpoint_every: usize,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub activation_checkpointing: bool,
    /// Stop after this step (a checkpoint is saved there), to be continued with `resume`.
    pub stop_after: Option<usize>,
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.steps == 0 || self.batch == 0 || self.accum == 0 {
            return bad(format!(
                "steps {}, batch {} and accumulation {} must be at least 1",
                self.steps, self.batch, self.accum
            ));
        }
        if let Some(c) = self.clip {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("gradient clip {c} must be a positive number"));
            }
        }
        if let Mode::Lora(l) = &self.mode {
            l.validate()?;
        }
        self.optimizer.validate()?;
        self.schedule.validate()?;
        if self.schedule.total != self.steps {
            return bad(format!("the schedule spans {} steps, the run {}", self.schedule.total, self.steps));
        }
        Ok(())
    }

    /// Everything that decides the weights (not how often to log or save).
    fn identity(&self) -> serde_json::Value {
        let mode = match &self.mode {
            Mode::Full => serde_json::json!("full"),
            Mode::Lora(l) => serde_json::json!({
                "rank": l.rank, "alpha": l.alpha, "dropout": l.dropout, "rslora": l.rslora,
                "targets": l.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
            }),
        };
        serde_json::json!({
            "mode": mode, "steps": self.steps, "batch": self.batch, "accum": self.accum,
            "schedule": self.schedule, "optimizer": self.optimizer, "clip": self.clip, "seed": self.seed,
            // The recomputation gives the same gradients, but not provably the same bits.
            "recompute": self.activation_checkpointing,
        })
    }
}

/// One optimiser step, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    /// Mean NLL per target token of the step's batch.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// A held-out evaluation, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct EvalLog {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub eval_tokens: usize,
}

/// What a run reports as it goes (progress bars, logs).
pub trait Observer {
    fn step(&mut self, _log: &StepLog) {}
    fn eval(&mut self, _log: &EvalLog) {}
}

/// Where a run writes: the result (adapter or model folder), the checkpoint, the JSONL log.
pub struct Paths {
    pub output: PathBuf,
    pub checkpoint: PathBuf,
    pub log: PathBuf,
}

impl Paths {
    pub fn beside(output: &Path) -> Self {
        let s = output.to_string_lossy().trim_end_matches('/').to_string();
        Self {
            output: output.to_path_buf(),
            checkpoint: PathBuf::from(format!("{s}.checkpoint.safetensors")),
            log: PathBuf::from(format!("{s}.log.jsonl")),
        }
    }
}

pub struct Summary {
    pub steps: usize,
    pub first_eval: Option<EvalLog>,
    pub last_eval: Option<EvalLog>,
    pub tokens_per_s: f64,
}

/// The parameters a run trains, with weight decay off for norms (and any 1-D tensor).
pub fn params_of(model: &Model) -> Vec<Param> {
    model
        .params()
        .iter()
        .map(|(n, v)| Param::new(n.clone(), v.clone(), v.as_tensor().rank() >= 2 && !n.contains("norm"), "all"))
        .collect()
}

/// Held-out perplexity: mean NLL per target token over the first `max_rows` rows.
pub fn evaluate(model: &Model, data: &Dataset, batch: usize, max_rows: usize) -> Result<(f64, usize)> {
    let n = if max_rows == 0 { data.examples.len() } else { max_rows.min(data.examples.len()) };
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in data.examples[..n].chunks(batch.max(1)) {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = chunk.iter().map(|e| (e.tokens.clone(), e.targets.clone())).collect();
        let b = Batch::from_rows(&rows, 0)?;
        let (l, _) = model.loss(&b, &Plan::default(), 1.0)?;
        nll += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += b.target_count();
    }
    if count == 0 {
        return Err(Error::Data(format!("{}: no target tokens to evaluate", data.describe)));
    }
    Ok((nll / count as f64, count))
}

/// Runs (or, with `resume`, continues) a fine-tune of `model`, which must already carry what it
/// trains (trainable weights, or LoRA branches from [`prepare`]). Writes the checkpoint and log
/// as it goes; the result is written by [`save_output`].
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    base: &str,
    train: &Dataset,
    held: &Dataset,
    cfg: &FinetuneConfig,
    paths: &Paths,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    cfg.validate()?;
    if train.examples.is_empty() {
        return Err(Error::Data(format!("{}: no training rows", train.describe)));
    }
    let params = params_of(model);
    if params.is_empty() {
        return Err(Error::Config("nothing to train: the model has no trainable parameters".into()));
    }
    let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
    let mut opt = Optimizer::new(cfg.optimizer, &params)?;
    let run_id = {
        let id = serde_json::json!({ "config": cfg.identity(), "model": base, "data": train.hash, "held": held.hash });
        let h = <sha2::Sha256 as sha2::Digest>::digest(id.to_string().as_bytes());
        h.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut order = Order::new(cfg.seed, train.examples.len());
    let (mut start, mut cursor) = (0usize, 0usize);
    let mut first_eval = None;
    if resume {
        let ck = Loaded::open(&paths.checkpoint)?;
        let state = ck.state(&paths.checkpoint)?;
        if state.get("run").and_then(|v| v.as_str()) != Some(run_id.as_str()) {
            return Err(Error::Checkpoint(format!(
                "{}: a checkpoint of another run (other settings, data or model); start afresh without --resume",
                paths.checkpoint.display()
            )));
        }
        ck.restore(&paths.checkpoint, &params, &mut opt)?;
        start = state["step"].as_u64().unwrap_or(0) as usize;
        cursor = state["cursor"].as_u64().unwrap_or(0) as usize;
        first_eval = serde_json::from_value::<Option<(usize, f64, f64, usize)>>(state["first_eval"].clone())
            .ok()
            .flatten()
            .map(|(step, eval_loss, eval_ppl, eval_tokens)| EvalLog { step, eval_loss, eval_ppl, eval_tokens });
        truncate_log(&paths.log, start)?;
        tracing::info!("resuming at step {start} of {}", cfg.steps);
    } else if paths.log.exists() {
        std::fs::remove_file(&paths.log).map_err(|e| Error::Data(format!("{}: {e}", paths.log.display())))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|e| Error::Data(format!("{}: {e}", paths.log.display())))?;
    let mut write_log = |v: &serde_json::Value| -> Result<()> {
        writeln!(log, "{v}").map_err(|e| Error::Data(format!("{}: {e}", paths.log.display())))
    };
    let eval_now = |step: usize| -> Result<EvalLog> {
        let (loss, tokens) = evaluate(model, held, cfg.batch, cfg.eval_rows)?;
        Ok(EvalLog { step, eval_loss: loss, eval_ppl: loss.exp(), eval_tokens: tokens })
    };
    if first_eval.is_none() {
        let e = eval_now(0)?;
        write_log(&serde_json::to_value(&e).unwrap_or_default())?;
        obs.eval(&e);
        first_eval = Some(e);
    }
    let mut last_eval = None;
    let (mut tokens_done, run_start) = (0usize, Instant::now());
    let end = cfg.stop_after.map_or(cfg.steps, |s| s.min(cfg.steps));
    for step in start..end {
        let t0 = Instant::now();
        let lr = cfg.schedule.lr(step);
        let micro: Vec<Batch> = (0..cfg.accum)
            .map(|_| {
                let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..cfg.batch)
                    .map(|_| {
                        let e = &train.examples[order.row(cursor)];
                        cursor += 1;
                        (e.tokens.clone(), e.targets.clone())
                    })
                    .collect();
                Batch::from_rows(&rows, 0)
            })
            .collect::<std::result::Result<_, _>>()?;
        let targets: usize = micro.iter().map(Batch::target_count).sum();
        if targets == 0 {
            return Err(Error::Data(format!("step {}: no target tokens in the batch", step + 1)));
        }
        let mut grads = vec![None; vars.len()];
        let mut loss = 0f64;
        for (m, b) in micro.iter().enumerate() {
            let plan = Plan {
                dropout_seed: Some(mix(cfg.seed ^ mix(((step * cfg.accum + m) as u64) << 8))),
                ..Default::default()
            };
            let g = model.loss_and_grads(b, &plan, &vars, 1.0 / targets as f64, cfg.activation_checkpointing)?;
            loss += g.loss + g.aux;
            accumulate(&mut grads, g.grads)?;
        }
        let norm = clip_grad_norm(&mut grads, cfg.clip)?;
        let kept = || match paths.checkpoint.exists() {
            true => format!("the last good checkpoint is {} (resume with --resume)", paths.checkpoint.display()),
            false => "no checkpoint was saved yet".to_string(),
        };
        if !loss.is_finite() || !norm.is_finite() {
            return Err(Error::Diverged(format!(
                "the loss became {} at step {} (gradient norm {norm}); lower --lr; {}",
                if loss.is_finite() { format!("{loss:.4}") } else { loss.to_string() },
                step + 1,
                kept()
            )));
        }
        opt.step(&params, &grads, lr, &|_| true).map_err(|e| match e {
            Error::Diverged(m) => Error::Diverged(format!("step {}: {m} (--lr); {}", step + 1, kept())),
            e => e,
        })?;
        let secs = t0.elapsed().as_secs_f64();
        tokens_done += micro.iter().map(|b| b.rows * b.t).sum::<usize>();
        let s = StepLog {
            step: step + 1,
            loss,
            lr,
            grad_norm: norm,
            tokens: micro.iter().map(|b| b.rows * b.t).sum(),
            seconds: secs,
            tokens_per_s: micro.iter().map(|b| b.rows * b.t).sum::<usize>() as f64 / secs,
        };
        write_log(&serde_json::to_value(&s).unwrap_or_default())?;
        obs.step(&s);
        let last = step + 1 == cfg.steps;
        if last || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0) {
            let e = eval_now(step + 1)?;
            write_log(&serde_json::to_value(&e).unwrap_or_default())?;
            obs.eval(&e);
            last_eval = Some(e);
        }
        if last || step + 1 == end || (cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0) {
            let fe = first_eval.as_ref().map(|e| (e.step, e.eval_loss, e.eval_ppl, e.eval_tokens));
            let state = serde_json::json!({ "run": run_id, "step": step + 1, "cursor": cursor, "first_eval": fe });
            checkpoint::save(&paths.checkpoint, &params, &opt, &state)?;
        }
    }
    Ok(Summary {
        steps: end,
        first_eval,
        last_eval,
        tokens_per_s: tokens_done as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Keeps the log lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    recompose_core::atomic::write_bytes(path, out.as_bytes())?;
    Ok(())
}

/// Makes `model` trainable for `mode`: LoRA branches (seeded PEFT initialisation) on a frozen
/// model; for a full fine-tune the model must have been loaded with every weight trainable.
pub fn prepare(model: &mut Model, mode: &Mode, seed: u64) -> Result<()> {
    match mode {
        Mode::Lora(l) => Ok(model.add_lora(l, seed)?),
        Mode::Full if model.params().is_empty() => {
            Err(Error::Config("a full fine-tune needs the model loaded with every weight trainable".into()))
        }
        Mode::Full => Ok(()),
    }
}

/// Writes the result: a PEFT adapter folder (LoRA) or an HF model folder (full), in HF's
/// weight convention, tied to its base model by `recompose.*` metadata.
pub fn save_output(model: &mut Model, file: &ModelFile, base: &str, mode: &Mode, out: &Path) -> Result<()> {
    match mode {
        Mode::Lora(l) => {
            let factors = model.adapter_factors()?;
            let modules: Vec<String> = factors.keys().cloned().collect();
            let targets: Vec<&str> = l.targets.iter().map(|t| t.module()).collect();
            let cfg = recompose_core::peft::AdapterConfig::lora(l.rank, l.alpha, l.dropout, &targets, l.rslora, base);
            let meta = recompose_core::peft::base_identity(file, base, &modules)?;
            recompose_core::peft::Adapter::write(out, &cfg, &factors, &meta)?;
        }
        Mode::Full => {
            let c = model.config.clone();
            let tok = file.tokenizer()?;
            let mut tensors: Vec<(String, candle_core::Tensor)> = vec![];
            for (n, v) in model.params() {
                let t = recompose_core::convert::hf_from_runtime(&c, n, v.as_tensor().detach().to_dtype(DType::F32)?)?;
                tensors.push((n.clone(), t));
            }
            let plan: Vec<recompose_core::safetensors_out::PlannedTensor> = tensors
                .iter()
                .map(|(n, t)| recompose_core::safetensors_out::PlannedTensor {
                    name: n.clone(),
                    dtype: DType::F32,
                    shape: t.dims().to_vec(),
                })
                .collect();
            recompose_core::convert::write_hf_dir(out, &c, &tok, &plan, |i| Ok(tensors[i].1.clone()))?;
        }
    }
    Ok(())
}
