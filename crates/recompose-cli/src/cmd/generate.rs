//! `recompose generate`: stream a continuation of a prompt (or a chat reply) to stdout.

use crate::common::ModelArgs;
use anyhow::{Context, Result};
use recompose_core::chat::{self, Message};
use recompose_llm::generate::{generate, GenerateOptions};
use recompose_llm::sample::SamplingParams;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
    /// KV-cache policy (full, window:N, h2o:N or h2o:FRACTION; see --help).
    #[arg(long, value_parser = crate::common::parse_kv, default_value = "full", long_help = crate::common::KV_HELP)]
    pub kv: recompose_kv::KvSpec,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// Maximum new tokens.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set with this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already in the context (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => anyhow::bail!("give a prompt with --prompt or --prompt-file"),
    };
    let opts = a.gen.options();
    opts.validate().map_err(anyhow::Error::msg)?;
    let (_file, model, tok, store) = a.model.load_with_store()?;
    let text = if a.chat {
        let template = tok.chat_template.as_deref().context("this model has no chat template")?;
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(Message { role: "system".into(), content: s.clone() });
        }
        msgs.push(Message { role: "user".into(), content: prompt });
        let bos = tok.bos.and_then(|b| tok.id_to_token(b)).unwrap_or_default();
        chat::render(template, &msgs, true, &bos, "")?
    } else {
        prompt
    };
    // A chat template writes BOS itself when the model wants one.
    let ids = tok.encode(&text, !a.chat)?;
    let layout = model.cache_layout();
    let stdout = std::io::stdout();
    let (gens, t) = generate(
        &model,
        &tok,
        &[ids],
        &opts,
        |n| a.kv.build(&layout, &[n]),
        |_, piece| {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        },
    )?;
    println!();
    let g = &gens[0];
    let decode_steps = t.decode_tokens.saturating_sub(1).max(1);
    eprintln!(
        "prompt {} tokens, {:.1} tok/s prefill; generated {} tokens, {:.1} tok/s decode ({:?}); KV cache {}: {:.2} MiB",
        g.prompt_tokens,
        g.prompt_tokens as f64 / t.prefill_secs.max(1e-9),
        t.decode_tokens,
        decode_steps as f64 / t.decode_secs.max(1e-9),
        g.finish,
        a.kv,
        g.kv_bytes as f64 / 1048576.0
    );
    if let Some(s) = store {
        eprintln!("{}", s.stats());
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    let (rss, peak) = (recompose_eval::bench::rss_bytes(), recompose_eval::bench::peak_rss_bytes());
    tracing::info!("memory: {:.0} MiB resident now, {:.0} MiB at the peak", mib(rss), mib(peak));
    Ok(())
}
