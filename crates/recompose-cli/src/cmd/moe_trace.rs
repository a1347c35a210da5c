//! `recompose moe-trace`: what a pre-gated MoE's routes let a server do, replayed offline. A
//! trace of requests (held-out texts of the calibration domains, Poisson arrivals) runs through
//! a model of the scheduler in steps under each batching policy; the report is the experts a
//! step needs and the hit rate of an expert cache of each capacity under each eviction policy.
//! It sizes `--expert-budget` before a server runs; the server's own store measures the same
//! with real loads.

use crate::common::ModelArgs;
use anyhow::{Context, Result};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use recompose_moe::cache::{self, ExpertCache};
use recompose_moe::trace::{self, Batching, CacheRun, Limits, Request};
use recompose_moe::{domains, MoeConfig};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Domains the requests' texts come from (their held-out tenth), comma-separated; default
    /// the MoE's own experts' domains.
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Requests in the trace, drawn in turn from each domain.
    #[arg(long, default_value_t = 140)]
    requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Completion tokens per request (the text that followed the prompt, as if generated).
    #[arg(long, default_value_t = 32)]
    completion: usize,
    /// Mean arrivals per step (Poisson).
    #[arg(long, default_value_t = 0.2)]
    rate: f64,
    /// Cache capacities to replay, in experts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5")]
    capacity: Vec<usize>,
    /// Steps Belady looks ahead; beyond them no use is known.
    #[arg(long, default_value_t = 32)]
    horizon: usize,
    /// Sequences per step. Below --pool a step chooses which admitted sequences run, which is
    /// where batching policies differ; at --pool every admitted sequence runs each step, as
    /// `recompose serve` does today.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sequences admitted at once (each holds a KV cache); the rest wait in the queue.
    #[arg(long, default_value_t = 32)]
    pool: usize,
    /// Tokens per step (the server's default while any sequence decodes).
    #[arg(long, default_value_t = 64)]
    budget: usize,
    /// Prompt tokens one sequence runs per step.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Steps a ready sequence may be passed over by expert-aware batching.
    #[arg(long, default_value_t = 16)]
    max_wait: usize,
    /// Seeds the arrivals, the request order and the random policy.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct BatchingReport {
    batching: &'static str,
    steps: usize,
    tokens_per_step: f64,
    unique_experts: f64,
    latency_mean: f64,
    latency_p95: usize,
    first_token_mean: f64,
    cache: Vec<CacheRun>,
}

pub fn run(a: Args) -> Result<()> {
    let dir = a.model.moe.clone().context("moe-trace replays a MoE's routes: give --moe DIR")?;
    anyhow::ensure!(a.requests > 0 && a.prompt > 0, "--requests and --prompt must be at least 1");
    anyhow::ensure!(a.rate > 0.0 && a.rate.is_finite(), "--rate {} is not a positive number", a.rate);
    anyhow::ensure!(!a.capacity.is_empty(), "--capacity needs at least one value");
    let limits = Limits { batch: a.batch, budget: a.budget, chunk: a.chunk, pool: a.pool, max_wait: a.max_wait };
    limits.validate()?;
    let config = MoeConfig::read(&dir)?;
    anyhow::ensure!(
        config.router.is_some() && !config.layerwise,
        "{}: no pre-gating router (a layer-wise or pruned MoE); a trace needs routes known before the backbone runs",
        dir.display()
    );
    let experts = config.split.names.len();
    if let Some(&c) = a.capacity.iter().find(|&&c| c == 0 || c > experts) {
        anyhow::bail!("--capacity {c}: from 1 to the MoE's {experts} experts");
    }
    let (_, model, tok) = a.model.load()?;
    let names = if a.domains.is_empty() { config.split.names.clone() } else { a.domains.clone() };
    let ctx = a.prompt + a.completion;
    anyhow::ensure!(ctx <= model.config.max_position, "--prompt + --completion {ctx} exceed the context");
    let held: Vec<Vec<Vec<u32>>> = names
        .iter()
        .map(|n| {
            let d = domains::load(n, &tok, ctx, 1).with_context(|| format!("domain {n} (set --domains)"))?;
            Ok(d.held_out)
        })
        .collect::<Result<_>>()?;
    // Request i: domain i mod D, its (i / D)-th held-out row; the order of arrival shuffled.
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut rows: Vec<&Vec<u32>> = Vec::with_capacity(a.requests);
    for i in 0..a.requests {
        let h = &held[i % held.len()];
        rows.push(&h[(i / held.len()) % h.len()]);
    }
    rows.shuffle(&mut rng);
    let mut clock = 0.0f64;
    let mut requests = Vec::with_capacity(rows.len());
    for row in rows {
        let routes = model.routes(row)?;
        let (prompt, completion) = routes.split_at(a.prompt);
        requests.push(Request { arrival: clock as usize, prompt: prompt.to_vec(), completion: completion.to_vec() });
        clock += -(1.0 - rng.random::<f64>()).ln() / a.rate;
    }
    println!(
        "{} requests ({} prompt + {} completion tokens) from {}, {} arrivals/step; {} sequences/step of {} admitted, {} tokens/step",
        a.requests,
        a.prompt,
        a.completion,
        names.join(", "),
        a.rate,
        a.batch,
        a.pool,
        a.budget
    );
    let mut reports = Vec::new();
    for batching in Batching::ALL {
        let s = trace::schedule(&requests, experts, &limits, batching)?;
        let mut cache = Vec::new();
        for &c in &a.capacity {
            for name in cache::POLICIES {
                let run = ExpertCache::new(c, cache::policy(name, a.seed)?)?;
                cache.push(trace::replay(&s, run, a.horizon));
            }
        }
        let mut lat = s.latency.clone();
        lat.sort_unstable();
        let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
        reports.push(BatchingReport {
            batching: batching.name(),
            steps: s.steps.len(),
            tokens_per_step: (a.requests * ctx) as f64 / s.steps.len().max(1) as f64,
            unique_experts: s.unique_experts(),
            latency_mean: mean(&lat),
            latency_p95: lat[(lat.len() * 95 / 100).min(lat.len() - 1)],
            first_token_mean: mean(&s.first_token),
            cache,
        });
    }
    print_report(&reports, &a.capacity);
    if let Some(p) = &a.json {
        let body = serde_json::json!({
            "moe": dir, "domains": names, "requests": a.requests, "prompt": a.prompt,
            "completion": a.completion, "rate": a.rate, "horizon": a.horizon, "seed": a.seed,
            "limits": {"batch": a.batch, "pool": a.pool, "budget": a.budget, "chunk": a.chunk, "max_wait": a.max_wait},
            "batching": reports,
        });
        recompose_core::atomic::write_bytes(p, serde_json::to_string_pretty(&body)?.as_bytes())?;
    }
    Ok(())
}

fn print_report(reports: &[BatchingReport], capacity: &[usize]) {
    // Steps are not equal in cost (a prompt chunk of 64 tokens against 8 decode tokens), so
    // latency in steps is not time: tokens per step is beside it.
    println!("\n| batching | steps | tokens / step | unique experts / step | latency mean (steps) | p95 | first token mean |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {} | {:.1} |",
            r.batching, r.steps, r.tokens_per_step, r.unique_experts, r.latency_mean, r.latency_p95, r.first_token_mean
        );
    }
    for r in reports {
        println!("\nhit rate, {} batching:\n", r.batching);
        let head: Vec<String> = capacity.iter().map(|c| format!("{c} resident")).collect();
        println!("| policy | {} |", head.join(" | "));
        println!("|---|{}", "---:|".repeat(capacity.len()));
        for p in cache::POLICIES {
            let cells: Vec<String> = capacity
                .iter()
                .map(|&c| {
                    r.cache
                        .iter()
                        .find(|x| x.policy == *p && x.capacity == c)
                        .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x.hit_rate))
                })
                .collect();
            println!("| {p} | {} |", cells.join(" | "));
        }
    }
}
