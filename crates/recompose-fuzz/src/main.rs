//! `recompose-fuzz`: runs the fuzz targets from the command line; exits non-zero on a finding.

use clap::Parser;
use recompose_fuzz::{fuzz, replay, Options, TARGETS};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GUARD: recompose_fuzz::alloc::Guard = recompose_fuzz::alloc::Guard;

/// Mutation fuzzing of recompose's readers of untrusted input.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A target name, or `all` (one after another); see --list.
    #[arg(required_unless_present_any = ["list", "write_seeds"])]
    target: Option<String>,
    /// Seconds of mutation per target (the seeds run first, outside this).
    #[arg(long, default_value_t = 60.0)]
    secs: f64,
    /// Seed of the mutations: the same seed replays the same inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where crashing and hanging inputs are saved, one folder per target.
    #[arg(long, default_value = "target/fuzz-findings")]
    crashes: PathBuf,
    /// Seconds after which an input counts as a hang.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Runs these files through the target once each instead of fuzzing (to check a finding).
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
    /// Prints each outcome that made an input join the corpus.
    #[arg(long)]
    verbose: bool,
    /// Lists the targets.
    #[arg(long)]
    list: bool,
    /// Regenerates the binary seeds in the crate's corpus/ folder.
    #[arg(long)]
    write_seeds: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        TARGETS.iter().for_each(|t| println!("{:<18} {}", t.name, t.about));
        return ExitCode::SUCCESS;
    }
    if args.write_seeds {
        let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
        return match recompose_fuzz::seeds::write_binary_seeds(&corpus) {
            Ok(files) => {
                files.iter().for_each(|f| println!("{}", f.display()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let name = args.target.unwrap_or_default();
    let targets: Vec<_> = match name.as_str() {
        "all" => TARGETS.iter().collect(),
        n => match recompose_fuzz::find(n) {
            Some(t) => vec![t],
            None => {
                let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
                eprintln!("error: unknown target '{n}' (all, {})", names.join(", "));
                return ExitCode::from(2);
            }
        },
    };
    let Ok(timeout) = Duration::try_from_secs_f64(args.timeout) else {
        eprintln!("error: --timeout {} is not a number of seconds", args.timeout);
        return ExitCode::from(2);
    };
    let opts = Options {
        secs: args.secs,
        seed: args.seed,
        timeout,
        findings: args.crashes,
        progress: true,
        verbose: args.verbose,
    };
    if !args.replay.is_empty() {
        let files: Vec<(PathBuf, Vec<u8>)> =
            match args.replay.iter().map(|p| std::fs::read(p).map(|d| (p.clone(), d)).map_err(|e| (p, e))).collect() {
                Ok(f) => f,
                Err((p, e)) => {
                    eprintln!("error: {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            };
        let found: Vec<_> = targets.iter().flat_map(|t| replay(t, &files, &opts)).collect();
        found.iter().for_each(|f| println!("{f}"));
        println!("{} files, {} findings", files.len(), found.len());
        return if found.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let mut findings = 0;
    for t in targets {
        let report = fuzz(t, &opts);
        println!("{report}");
        findings += report.findings.len();
    }
    if findings > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
