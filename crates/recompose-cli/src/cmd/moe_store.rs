//! `recompose moe-store`: the expert store a MoE runs from under `--expert-budget`.
//!
//! - `write`: a MoE folder's routed experts, packed as the model runs them, into
//!   `DIR/experts.store`.
//! - `synth`: a store of random experts of a chosen size (a 7B model's, say), to measure loads
//!   where they cost what they cost at scale.
//! - `replay`: decode steps through a store's layers under a budget, a cache policy and
//!   prefetch (each row keeps its expert with probability `--locality`, else draws one), and
//!   the tokens/s, hit rate, load time and memory that come of it.

use crate::common::ModelArgs;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recompose_llm::ffn::{DenseFfn, Ffn, FfnContext};
use recompose_llm::kernels::quant::{Kind, PackedWeight};
use recompose_llm::linear::Linear;
use recompose_moe::store::{self, Budget, ExpertStore, StoreOptions, StoreStats};
use recompose_moe::MoeFfn;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write a MoE folder's routed experts to DIR/experts.store (give --model and --moe), as the
    /// model runs them: packed, or f32 with --f32 (a store serves the mode it was written in).
    Write {
        #[command(flatten)]
        model: ModelArgs,
        /// Where to write (default: experts.store in the MoE folder).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Write a store of seeded random Q4_0 experts of the given size.
    Synth {
        #[arg(long, short)]
        output: PathBuf,
        /// The model's hidden size.
        #[arg(long, default_value_t = 4096)]
        hidden: usize,
        /// FFN channels per expert (a multiple of 32).
        #[arg(long, default_value_t = 1376)]
        channels: usize,
        #[arg(long, default_value_t = 8)]
        experts: usize,
        #[arg(long, default_value_t = 32)]
        layers: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run decode steps through a store's experts and report speed, hits and loads.
    Replay {
        /// The store (`write` or `synth` made it).
        store: PathBuf,
        /// Experts per layer kept resident (a count, or a size as 2GiB).
        #[arg(long)]
        expert_budget: Budget,
        /// lru, lfu, random, belady, or none (every use reads).
        #[arg(long, default_value = "lru")]
        expert_cache: String,
        /// Read each step's experts on a worker thread while the layers compute.
        #[arg(long)]
        prefetch: bool,
        /// Decode steps timed (after --warmup).
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Steps run before timing (filling the cache).
        #[arg(long, default_value_t = 4)]
        warmup: usize,
        /// Rows decoded per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Chance a row's next token keeps its expert (Read-ME's temporal locality; 0.48-0.90
        /// measured on smollm2's MoE).
        #[arg(long, default_value_t = 0.7)]
        locality: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Write { model, output } => write(model, output),
        Command::Synth { output, hidden, channels, experts, layers, seed } => {
            synth(output, hidden, channels, experts, layers, seed)
        }
        Command::Replay {
            store,
            expert_budget,
            expert_cache,
            prefetch,
            steps,
            warmup,
            batch,
            locality,
            seed,
            json,
        } => {
            let opts = StoreOptions { budget: expert_budget, policy: expert_cache, seed, prefetch };
            replay(&store, &opts, steps, warmup, batch, locality, json)
        }
    }
}

fn write(model: ModelArgs, output: Option<PathBuf>) -> Result<()> {
    let dir = model.moe.clone().context("moe-store write: give the MoE folder (--moe DIR)")?;
    let (file, m, _) = model.load_base()?;
    let moe = recompose_moe::MoeModel::load(&dir, &file)?;
    let out = output.unwrap_or_else(|| dir.join(store::FILE_NAME));
    let t = Instant::now();
    let bytes = store::write(&out, &moe.config.base, &moe.ffns(&m)?)?;
    say!("wrote {} ({:.1} MiB) in {:.1} s", out.display(), bytes as f64 / 1048576.0, t.elapsed().as_secs_f64());
    Ok(())
}

/// A `rows x cols` Q4_0 weight of seeded random quants and scales near `scale`.
fn random_q4(rows: usize, cols: usize, scale: f32, rng: &mut StdRng) -> Result<PackedWeight> {
    let (q, s) = PackedWeight::raw_sizes(Kind::Q4_0, rows, cols).context("a shape that does not pack")?;
    let mut qs = vec![0u8; q];
    rng.fill(qs.as_mut_slice());
    let d = half::f16::from_f32(scale).to_bits().to_le_bytes();
    let sc: Vec<u8> = (0..s).map(|i| d[i % 2]).collect();
    PackedWeight::from_raw(Kind::Q4_0, rows, cols, &qs, &sc).context("packing a random weight")
}

fn synth(output: PathBuf, hidden: usize, channels: usize, experts: usize, layers: usize, seed: u64) -> Result<()> {
    anyhow::ensure!(
        hidden > 0 && hidden % 32 == 0 && channels > 0 && channels % 32 == 0,
        "--hidden and --channels must be positive multiples of 32"
    );
    anyhow::ensure!(experts >= 2 && layers >= 1, "--experts at least 2, --layers at least 1");
    let mut rng = StdRng::seed_from_u64(seed);
    let t = Instant::now();
    let moes = (0..layers)
        .map(|l| {
            let parts = (0..experts)
                .map(|e| {
                    let name = |p: &str| recompose_moe::ffn::part_name(l, Some(e), p);
                    // Scales that keep a random FFN's output of the order of its input.
                    let (a, b) = (1.0 / (hidden as f32).sqrt(), 1.0 / (channels as f32).sqrt());
                    Ok(Some(DenseFfn {
                        gate: Linear::packed(name("gate_proj"), Arc::new(random_q4(channels, hidden, a, &mut rng)?)),
                        up: Linear::packed(name("up_proj"), Arc::new(random_q4(channels, hidden, a, &mut rng)?)),
                        down: Linear::packed(name("down_proj"), Arc::new(random_q4(hidden, channels, b, &mut rng)?)),
                        activation: recompose_core::config::Activation::Silu,
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(MoeFfn::from_parts(l, None, parts))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = store::write(&output, &synthetic_base(hidden, channels, experts, layers), &moes)?;
    say!(
        "wrote {} ({:.2} GiB: {layers} layers x {experts} experts of {channels} x {hidden}, Q4_0) in {:.1} s",
        output.display(),
        bytes as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The identity a synthetic store is made for (no model has it).
fn synthetic_base(hidden: usize, channels: usize, experts: usize, layers: usize) -> String {
    format!("synthetic-{hidden}-{channels}-{experts}-{layers}")
}

#[derive(serde::Serialize)]
struct Report {
    store: PathBuf,
    batch: usize,
    steps: usize,
    locality: f64,
    tok_s: f64,
    step_ms_mean: f64,
    step_ms_p95: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    stats: StoreStats,
}

fn replay(
    path: &std::path::Path,
    opts: &StoreOptions,
    steps: usize,
    warmup: usize,
    batch: usize,
    locality: f64,
    json: Option<PathBuf>,
) -> Result<()> {
    anyhow::ensure!(steps > 0 && batch > 0, "--steps and --batch must be at least 1");
    anyhow::ensure!((0.0..=1.0).contains(&locality), "--locality {locality} is not a probability");
    // The layers run alone, with no model to check the store against.
    let base = store::read_index(path)?.0.base;
    let act = recompose_core::config::Activation::Silu;
    let s = Arc::new(ExpertStore::open(path, &base, act, opts)?);
    let (layers, experts) = (s.layers(), s.experts());
    let hidden = (0..experts).find_map(|e| s.shapes(0, e)).map(|sh| sh[0].1).context("the store's layer 0 is empty")?;
    let ffns: Vec<MoeFfn> = (0..layers).map(|l| MoeFfn::from_parts(l, None, vec![]).into_stored(s.clone())).collect();
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let x: Vec<f32> = (0..batch * hidden).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x = Tensor::from_vec(x, (batch, hidden), &Device::Cpu)?;
    let mut routes: Vec<u32> = (0..batch).map(|_| rng.random_range(0..experts as u32)).collect();
    let (start, lens) = (vec![0usize; batch], vec![1usize; batch]);
    let mut times = vec![];
    let mut before = s.stats();
    for step in 0..warmup + steps {
        if step == warmup {
            before = s.stats();
        }
        for r in routes.iter_mut() {
            if !rng.random_bool(locality) {
                *r = rng.random_range(0..experts as u32);
            }
        }
        let t = Instant::now();
        let mut h = x.clone();
        for (layer, f) in ffns.iter().enumerate() {
            let ctx = FfnContext {
                layer,
                batch,
                t: 1,
                start: &start,
                lens: &lens,
                route: Some(&routes),
                width: None,
                dropout_seed: None,
            };
            // Each layer reads the last one's output, so no layer can run before its input.
            let y = f.forward(&h, &ctx)?.y;
            let norm = y.sqr()?.mean_keepdim(1)?.sqrt()?.clamp(1e-6, f64::MAX)?;
            h = y.broadcast_div(&norm)?;
        }
        h.sum_all()?.to_scalar::<f32>()?;
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let after = s.stats();
    let stats = StoreStats {
        hits: after.hits - before.hits,
        loads: after.loads - before.loads,
        bytes_read: after.bytes_read - before.bytes_read,
        load_seconds: after.load_seconds - before.load_seconds,
        wait_seconds: after.wait_seconds - before.wait_seconds,
        ..after
    };
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize).clamp(1, sorted.len()) - 1];
    let r = Report {
        store: path.to_path_buf(),
        batch,
        steps,
        locality,
        tok_s: (steps * batch) as f64 / total.max(1e-9),
        step_ms_mean: 1e3 * total / steps as f64,
        step_ms_p95: 1e3 * p95,
        rss_mib: recompose_eval::bench::rss_bytes() as f64 / 1048576.0,
        peak_rss_mib: recompose_eval::bench::peak_rss_bytes() as f64 / 1048576.0,
        stats,
    };
    println!(
        "{:.2} tok/s, step {:.0} ms (p95 {:.0}), RSS {:.0} MiB (peak {:.0}); {}",
        r.tok_s, r.step_ms_mean, r.step_ms_p95, r.rss_mib, r.peak_rss_mib, r.stats
    );
    if let Some(p) = json {
        recompose_core::atomic::write_bytes(&p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}
