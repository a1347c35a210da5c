//! The `recompose` binary: parses flags, sets up logging and threads, dispatches to the
//! subcommands in `cmd/`. Errors print as one line and exit 1.

/// `eprintln!` that never panics: a server whose stderr was closed must keep serving and shut
/// down cleanly, and an error must not turn into a panic because it cannot be printed.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod cmd;
mod common;

use clap::{Parser, Subcommand};

/// recompose: make pretrained models cheaper, more adaptable and more robust to deploy, then run them.
#[derive(Parser, Debug)]
#[command(name = "recompose", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads for all compute (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Hide progress bars and informational logs.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download an asset (model or data set) into $RECOMPOSE_HOME.
    Fetch(cmd::fetch::Args),
    /// Show a model file's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(cmd::inspect::Args),
    /// Convert between GGUF and HF safetensors, optionally changing the dtype.
    Convert(cmd::convert::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(cmd::generate::Args),
    /// Evaluate a model (perplexity, MMLU).
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// Measure prefill/decode speed, time to first token and memory.
    Bench(cmd::bench::Args),
    /// Merge models with a mergekit YAML config (linear, ties, dare, slerp, model_stock, ...).
    Merge(cmd::merge::Args),
    /// Read-ME: split a dense model's FFN channels into a permanent part and one expert per
    /// calibration domain (shakespeare, austen, mmlu, text files).
    Moefy(cmd::moefy::Args),
    /// Read-ME serving, replayed offline: a request trace through a MoE's pre-gate routes, the
    /// experts each step needs by batching policy, and expert-cache hit rates by capacity.
    MoeTrace(cmd::moe_trace::Args),
    /// The expert store a MoE runs from under --expert-budget: write one, make a synthetic one,
    /// or replay decode steps through one.
    #[command(subcommand)]
    MoeStore(cmd::moe_store::Command),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics).
    Serve(cmd::serve::Args),
    /// Fine-tune a language model (LoRA or full) on text or chat data.
    Finetune(cmd::finetune::Args),
    /// LoRA adapters: merge one into a model's weights.
    #[command(subcommand)]
    Lora(cmd::lora::LoraCommand),
    /// Task vectors: extract (finetuned - base), apply with scales, remove.
    #[command(subcommand)]
    Tv(cmd::delta::TvCommand),
    /// Robust weight signatures: extract, apply with alpha, remove, inspect.
    #[command(subcommand)]
    Rws(cmd::delta::RwsCommand),
    /// Robust CNNs and MoE CNNs: train (standard, PGD-AT, TRADES, AdvMoE), eval (attacks, corruptions), corrupt.
    #[command(subcommand)]
    Vision(cmd::vision::VisionCommand),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            say!("{}", one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    let filter = if cli.quiet { "warn" } else { "info" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RECOMPOSE_LOG").unwrap_or_else(|_| filter.into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .log_internal_errors(false) // its report of a failed write would itself eprintln! and panic
        .try_init();
    // Errors are one line: libraries (candle) must not attach backtraces to them, even under
    // RUST_BACKTRACE=1, which still gives panics theirs. (Edition 2021: set_var is safe, and no
    // thread has started yet.)
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    if !matches!(cli.command, Command::Serve(_)) {
        end_quietly_on_closed_pipes();
        remove_unfinished_outputs_on_signals();
    }
    if let Err(e) = common::set_threads(cli.threads) {
        say!("error: {e:#}");
        std::process::exit(2);
    }
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Fetch(a) => cmd::fetch::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Convert(a) => cmd::convert::run(a, quiet),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Eval(a) => cmd::eval::run(a, quiet),
        Command::Bench(a) => cmd::bench::run(a, quiet),
        Command::Merge(a) => cmd::merge::run(a, quiet),
        Command::Moefy(a) => cmd::moefy::run(a, quiet),
        Command::MoeTrace(a) => cmd::moe_trace::run(a),
        Command::MoeStore(c) => cmd::moe_store::run(c),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Finetune(a) => cmd::finetune::run(a, quiet),
        Command::Lora(c) => cmd::lora::run(c, quiet),
        Command::Tv(c) => cmd::delta::run_tv(c, quiet),
        Command::Rws(c) => cmd::delta::run_rws(c, quiet),
        Command::Vision(c) => cmd::vision::run(c, quiet),
    };
    if let Err(e) = result {
        // One line: the chain of causes joined.
        say!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// Writing into a closed pipe (`recompose inspect --tensors M | head -1`) ends the process
/// quietly, as Unix tools do. Rust ignores SIGPIPE, so every print would fail with EPIPE and
/// `println!` would panic. The server keeps ignoring it: a client that closes its socket must
/// not stop it.
fn end_quietly_on_closed_pipes() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// SIGINT, SIGTERM or SIGHUP during `convert`, `merge`, `finetune`... removes the temporaries
/// beside their targets (hundreds of MB were left behind), then ends the process as the signal
/// would have. The server handles these itself: they start its graceful shutdown.
fn remove_unfinished_outputs_on_signals() {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else { return };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                recompose_core::atomic::abandon_unfinished();
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        });
    }
}

/// A clap error on one line, like every other error: its message and the lines that complete it
/// (the missing argument's name, a tip), without the usage block and the --help hint.
fn one_line(msg: &str) -> String {
    let parts: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    if parts.is_empty() {
        "error: bad arguments".into()
    } else {
        parts.join(" ")
    }
}
