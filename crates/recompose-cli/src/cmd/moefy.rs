//! `recompose moefy`: Read-ME's refactorisation of a dense model's FFNs into experts, by
//! calibration statistics per data domain, and its pre-gating router trained by distillation.
//! Writes the runnable MoE folder (config.json with the split and the model's identity,
//! router.safetensors: `--moe DIR` runs it), the layer-wise routing baseline and the pruned
//! baseline beside it (`DIR/layerwise`, `DIR/pruned`, runnable the same way), the statistics it
//! came from, and a report of the split and its held-out quality.

use crate::common::{progress, ModelArgs};
use anyhow::{Context, Result};
use recompose_llm::pregate::PreGate;
use recompose_moe::router::{self, TrainOptions};
use recompose_moe::{domains, oracle, stats, ExpertSplit, MoeConfig, MoeModel};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration domains, one expert each (comma-separated): shakespeare, austen, mmlu, code,
    /// docs, fortunes, bigbench (assets, fetched when needed), or text files or folders of .txt
    /// files.
    #[arg(long, value_delimiter = ',', required = true)]
    calib: Vec<String>,
    /// Routed experts: one per calibration domain (so when given it must equal their count),
    /// or with --cluster the number of clusters.
    #[arg(long)]
    experts: Option<usize>,
    /// Find the experts without domain labels: the calibration tokens of all --calib texts
    /// pooled and clustered by their FFN activation patterns (balanced k-means on every 4th
    /// token), one expert per cluster.
    #[arg(long)]
    cluster: bool,
    /// Fraction of each layer's FFN channels a domain keeps: what a token runs.
    #[arg(long, default_value_t = 0.5)]
    keep: f64,
    /// Calibration rows per domain, drawn evenly from all but the domain's last tenth.
    #[arg(long, default_value_t = 64)]
    rows: usize,
    /// Tokens per calibration row.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Held-out rows per domain to score the split on (dense, each expert, the dense model
    /// pruned to the same size); 0 skips it.
    #[arg(long, default_value_t = 16)]
    eval_rows: usize,
    /// Training steps of the pre-gating router (8 rows a step, AdamW), distilled towards each
    /// calibration token's oracle expert; at least 1 (a MoE runs through its router).
    #[arg(long, default_value_t = 300)]
    router_steps: usize,
    /// The router's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    router_lr: f64,
    /// Training steps of the layer-wise routing baseline (one linear gate per layer over its
    /// FFN input, distilled towards the layer's own oracle expert; every 8th calibration token,
    /// 512 a step); 0 skips it. Scored beside the pre-gating router, fine-tuned beside it with
    /// --finetune-steps, and written to DIR/layerwise.
    #[arg(long, default_value_t = 300)]
    layerwise_steps: usize,
    /// Expert fine-tuning steps (LM loss, every expert's and the permanent part's weights
    /// trainable, the router frozen and routing as at run time, f32); the layer-wise MoE and the
    /// dense model pruned to the same size are fine-tuned with the same token budget to
    /// compare. 0 skips all three.
    #[arg(long, default_value_t = 0)]
    finetune_steps: usize,
    /// Fine-tuning rows per domain (of --ctx tokens, from the calibration part of its text).
    #[arg(long, default_value_t = 128)]
    finetune_rows: usize,
    /// Rows per fine-tuning step.
    #[arg(long, default_value_t = 4)]
    finetune_batch: usize,
    /// Peak fine-tuning learning rate (AdamW, a tenth of the steps warming up, cosine to a
    /// tenth).
    #[arg(long, default_value_t = 1e-4)]
    finetune_lr: f64,
    /// Output folder: the MoE (config.json: the split and the model's identity;
    /// router.safetensors: the trained router), stats.json (the per-domain channel
    /// statistics) and report.json (calibration, the per-layer split, held-out quality).
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(serde::Serialize)]
struct Calibration {
    name: String,
    rows: usize,
    tokens: u64,
    held_out_rows: usize,
}

#[derive(serde::Serialize)]
struct Report {
    format: &'static str,
    /// The model's identity (as in config.json).
    model: String,
    calibration: Vec<Calibration>,
    ctx: usize,
    layers: Vec<recompose_moe::experts::LayerReport>,
    /// Held-out perplexity per domain, before any training.
    quality: Vec<Quality>,
    router_share: RouterShares,
    /// After fine-tuning (with --finetune-steps).
    finetuned: Option<Finetuned>,
}

/// Held-out perplexity after fine-tuning the MoE's experts and the pruned model with the same
/// token budget, all in f32, beside the dense model in f32.
#[derive(serde::Serialize)]
struct Finetuned {
    steps: usize,
    tokens: usize,
    domains: Vec<String>,
    dense_f32: Vec<f64>,
    moe: Vec<f64>,
    /// The layer-wise MoE (with --layerwise-steps).
    layerwise: Option<Vec<f64>>,
    pruned: Vec<f64>,
    /// Held-out perplexity over all domains before and after, from the training loop.
    moe_run: (f64, f64),
    layerwise_run: Option<(f64, f64)>,
    pruned_run: (f64, f64),
}

/// One domain's held-out perplexity: the dense model, each expert (own and others), and the
/// dense model pruned to the same active FFN size.
#[derive(serde::Serialize)]
struct Quality {
    domain: String,
    tokens: usize,
    dense: f64,
    experts: Vec<f64>,
    /// Every token through its oracle expert (the best overlap of its active channels).
    oracle: f64,
    pruned: f64,
    /// Tokens whose oracle expert is the domain's own.
    oracle_is_own: Option<f64>,
    /// Consecutive tokens with the same oracle expert.
    oracle_locality: f64,
    /// Share of the domain's tokens per oracle expert.
    oracle_load: Vec<f64>,
    /// With a trained router: perplexity through its routes, how often it picks the oracle
    /// expert and the domain's own, how often consecutive tokens share its pick, its load.
    router: Option<RouterQuality>,
    /// Consecutive tokens with the same per-layer oracle expert (mean over the layers).
    layer_oracle_locality: f64,
    /// With layer-wise gates: perplexity through them, how often each layer's gate picks that
    /// layer's oracle expert, their locality and load (means over the layers).
    layerwise: Option<LayerwiseQuality>,
}

#[derive(serde::Serialize)]
struct LayerwiseQuality {
    ppl: f64,
    matches_layer_oracle: f64,
    locality: f64,
    load: Vec<f64>,
}

/// Each router's share of the wall time of its held-out runs (whole rows at a time).
#[derive(serde::Serialize, Default)]
struct RouterShares {
    pregate: Option<f64>,
    layerwise: Option<f64>,
}

#[derive(serde::Serialize)]
struct RouterQuality {
    ppl: f64,
    matches_oracle: f64,
    /// How often its one pick for all layers is each layer's own oracle expert (mean over the
    /// layers).
    matches_layer_oracle: f64,
    is_own: Option<f64>,
    locality: f64,
    load: Vec<f64>,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    anyhow::ensure!(a.model.moe.is_none(), "moefy makes a MoE from a dense model: drop --moe");
    anyhow::ensure!(a.keep > 0.0 && a.keep <= 1.0, "--keep {} is not a fraction in (0, 1]", a.keep);
    anyhow::ensure!(a.rows > 0 && a.ctx > 1, "--rows must be at least 1 and --ctx at least 2");
    let mut names = a.calib.clone();
    names.sort();
    names.dedup();
    anyhow::ensure!(names.len() == a.calib.len(), "--calib names a domain twice");
    if a.cluster {
        let e = a.experts.context("--cluster needs --experts E: how many clusters to find")?;
        anyhow::ensure!((2..=64).contains(&e), "--experts {e}: from 2 to 64 clusters");
    } else {
        anyhow::ensure!(
            a.calib.len() >= 2,
            "--calib needs at least two domains (one expert each), or --cluster --experts E"
        );
        if let Some(e) = a.experts {
            anyhow::ensure!(
                e == a.calib.len(),
                "--experts {e} for {} calibration domains: each expert is one domain's (--cluster finds E experts without labels)",
                a.calib.len()
            );
        }
    }
    anyhow::ensure!(a.router_steps > 0, "--router-steps must be at least 1: a MoE runs through its router");
    anyhow::ensure!(!a.output.is_file(), "{} is a file; -o takes a folder", a.output.display());
    let (file, mut model, tok) = a.model.load()?;
    anyhow::ensure!(
        a.ctx <= model.config.max_position,
        "--ctx {} is longer than the model's context of {}",
        a.ctx,
        model.config.max_position
    );
    // Every domain's text first: a thin or missing one fails before any statistics are taken.
    // The token ids are kept: fine-tuning draws its rows from them too.
    let mut loaded = vec![];
    let mut texts = vec![];
    for name in &a.calib {
        let ids = domains::ids(name, &tok).with_context(|| format!("calibration domain {name}"))?;
        let d = domains::cut(name, &ids, a.ctx, a.rows).with_context(|| format!("calibration domain {name}"))?;
        let tokens: usize = d.calib.iter().map(Vec::len).sum();
        recompose_moe::experts::enough_tokens(name, tokens as u64)
            .map_err(|e| anyhow::anyhow!("calibration domain {e}; raise --rows or --ctx"))?;
        loaded.push(d);
        texts.push(ids);
    }
    let mut all = vec![];
    let mut held = vec![];
    let mut calib_rows = vec![];
    let mut calibration = vec![];
    for (name, d) in a.calib.iter().zip(loaded) {
        let tokens = d.calib.iter().map(|r| r.len() as u64).sum();
        if !a.cluster {
            let pb = progress(d.calib.len() as u64, &format!("statistics: {name}"), quiet);
            all.push(stats::collect(&mut model, name, &d.calib, |done, _| pb.set_position(done as u64))?);
            pb.finish_and_clear();
        }
        tracing::info!("{name}: {} rows, {tokens} tokens ({} rows held out)", d.calib.len(), d.held_out.len());
        calibration.push(Calibration {
            name: name.clone(),
            rows: d.calib.len(),
            tokens,
            held_out_rows: d.held_out.len(),
        });
        held.push(d.held_out.into_iter().take(a.eval_rows).collect::<Vec<_>>());
        calib_rows.push(d.calib);
    }
    if let (true, Some(k)) = (a.cluster, a.experts) {
        let pooled: Vec<Vec<u32>> = calib_rows.iter().flatten().cloned().collect();
        let pb = progress(2 * pooled.len() as u64, "clustering", quiet);
        all = recompose_moe::cluster::cluster_stats(&mut model, &pooled, k, 4, 0, |d, _| pb.set_position(d as u64))?;
        pb.finish_and_clear();
        for c in &all {
            recompose_moe::experts::enough_tokens(&c.name, c.tokens)
                .map_err(|e| anyhow::anyhow!("{e}; raise --rows or lower --experts"))?;
        }
        let sizes: Vec<String> = all.iter().map(|c| c.tokens.to_string()).collect();
        tracing::info!("{k} clusters of {} tokens", sizes.join(" / "));
    }
    let split = ExpertSplit::from_domains(&all, a.keep)?;
    let identity = recompose_moe::format::identity(&file)?;
    let (router, gates) = train_routers(&mut model, &split, &calib_rows, &a, quiet)?;
    let (quality, router_share, router) = if a.eval_rows > 0 {
        model.set_pregate(Some(router));
        let q = score(&mut model, &a.calib, &held, &split, &all, gates.as_ref(), !a.cluster, quiet);
        let router = model.set_pregate(None).context("the router went missing while scoring")?;
        let (q, s) = q?;
        (q, s, router)
    } else {
        (vec![], RouterShares::default(), router)
    };
    std::fs::create_dir_all(&a.output).with_context(|| format!("creating {}", a.output.display()))?;
    let pruned = ExpertSplit::pruned(&all, a.keep)?;
    let (finetuned, trained) = if a.finetune_steps > 0 {
        let (f, t) = finetune(&a, &texts, &identity, &split, &pruned, &router, gates.as_ref(), &held, quiet)?;
        (Some(f), t)
    } else {
        (None, Trained::default())
    };
    let out = Report {
        format: "recompose-moe-report/1",
        model: identity.clone(),
        calibration,
        ctx: a.ctx,
        layers: split.report(),
        quality,
        router_share,
        finetuned,
    };
    recompose_core::atomic::write_bytes(&a.output.join("stats.json"), serde_json::to_string(&all)?.as_bytes())?;
    recompose_core::atomic::write_bytes(&a.output.join("report.json"), serde_json::to_string_pretty(&out)?.as_bytes())?;
    let moe = MoeModel {
        experts: trained.moe,
        config: MoeConfig {
            format: recompose_moe::format::FORMAT.into(),
            base: identity,
            split: split.clone(),
            router: Some(router.config),
            layerwise: false,
        },
        router: Some(router),
        gates: None,
    };
    moe.save(&a.output)?;
    // The baselines, runnable too: the same experts behind one gate per layer (--moe
    // DIR/layerwise), and the pruned model, whose channels are all permanent (--moe DIR/pruned).
    if let Some(g) = gates {
        let config = MoeConfig { router: None, layerwise: true, ..moe.config.clone() };
        MoeModel { config, router: None, gates: Some(g), experts: trained.layerwise }
            .save(&a.output.join("layerwise"))?;
    }
    let config = MoeConfig { split: pruned, router: None, ..moe.config.clone() };
    MoeModel { config, router: None, gates: None, experts: trained.pruned }.save(&a.output.join("pruned"))?;
    print_report(&split, &out.layers);
    print_quality(&out.quality, &split.names);
    let share = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{:.2}%", 100.0 * s));
    println!(
        "router share of the held-out runs' time: pre-gate {}, layer-wise gates {}",
        share(out.router_share.pregate),
        share(out.router_share.layerwise)
    );
    if let Some(f) = &out.finetuned {
        println!(
            "held-out perplexity after {} fine-tuning steps ({} tokens), f32 (dense / MoE through its router / layer-wise MoE / pruned to the same size):",
            f.steps, f.tokens
        );
        for (i, d) in f.domains.iter().enumerate() {
            let lw = f.layerwise.as_ref().map_or("-".to_string(), |l| format!("{:.2}", l[i]));
            println!("{d:>12} {:>10.2} {:>10.2} {lw:>10} {:>10.2}", f.dense_f32[i], f.moe[i], f.pruned[i]);
        }
    }
    println!("wrote the MoE to {} (run it with --moe {0})", a.output.display());
    Ok(())
}

fn print_report(split: &ExpertSplit, report: &[recompose_moe::experts::LayerReport]) {
    let c = split.channels;
    println!(
        "{} experts ({}), keep {} of {c} channels per layer",
        split.names.len(),
        split.names.join(", "),
        split.keep
    );
    println!("{:>5} {:>10} {:>24} {:>7} {:>8}", "layer", "permanent", "expert channels", "shared", "dropped");
    for r in report {
        let e: Vec<String> = r.experts.iter().map(usize::to_string).collect();
        println!("{:>5} {:>10} {:>24} {:>7} {:>8}", r.layer, r.permanent, e.join("/"), r.shared, r.dropped);
    }
    let perm: usize = report.iter().map(|r| r.permanent).sum();
    println!(
        "permanent: {:.1}% of the kept channels on average",
        100.0 * perm as f64 / (report.len() as f64 * (c as f64 * split.keep).round()).max(1.0)
    );
}

/// Held-out perplexity of every domain under the dense model, each expert, the oracle routes,
/// the pre-gating router (the model's), the layer-wise gates and pruning; routing accuracy,
/// locality and load of both routers; and each router's share of the time of its runs.
#[allow(clippy::too_many_arguments)]
fn score(
    model: &mut recompose_llm::Model,
    names: &[String],
    held: &[Vec<Vec<u32>>],
    split: &ExpertSplit,
    stats: &[recompose_moe::ChannelStats],
    gates: Option<&recompose_moe::layerwise::Gates>,
    labelled: bool,
    quiet: bool,
) -> Result<(Vec<Quality>, RouterShares)> {
    // With domain experts, domain d's own expert is expert d; clusters have no owner.
    let own = |load: &[f64], d: usize| labelled.then(|| load[d]);
    use recompose_moe::quality::{everyone_to, held_out_nll};
    use recompose_moe::{ffn, layerwise};
    let router = model.pregate().is_some();
    let experts = split.names.len();
    let runs = names.len() * (3 + experts + usize::from(router) + usize::from(gates.is_some()));
    let pb = progress(runs as u64, "held-out perplexity", quiet);
    let ppl = |model: &recompose_llm::Model, rows: &[Vec<u32>], routes: Option<&[Vec<u32>]>| -> Result<(f64, usize)> {
        let (nll, n) = held_out_nll(model, rows, routes)?;
        pb.inc(1);
        Ok((nll.exp(), n))
    };
    let mut q: Vec<Quality> = vec![];
    let mut oracles = vec![];
    for (d, (name, rows)) in names.iter().zip(held).enumerate() {
        let (dense, tokens) = ppl(model, rows, None)?;
        let per_layer = oracle::layer_overlaps(model, split, rows, |_, _| {})?;
        let best = oracle::best(&oracle::summed(&per_layer, experts));
        let layer_best: Vec<Vec<Vec<u32>>> =
            (0..split.layers()).map(|l| oracle::best(&oracle::at_layer(&per_layer, l, experts))).collect();
        let load = oracle::load(&best, experts);
        let mut layerwise_q = None;
        if let Some(g) = gates {
            // The gates' picks from the dense model's FFN inputs, against each layer's oracle.
            let xs = layerwise::inputs(model, rows, 1)?;
            let picks: Vec<Vec<u32>> = (0..split.layers()).map(|l| g.route(l, &xs[l])).collect::<Result<_, _>>()?;
            let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
            let by_row = |flat: &[u32]| -> Vec<Vec<u32>> {
                let mut at = 0;
                lens.iter()
                    .map(|&n| {
                        at += n;
                        flat[at - n..at].to_vec()
                    })
                    .collect()
            };
            let picks: Vec<Vec<Vec<u32>>> = picks.iter().map(|p| by_row(p)).collect();
            let mean = |f: &dyn Fn(usize) -> f64| (0..split.layers()).map(f).sum::<f64>() / split.layers() as f64;
            let loads: Vec<Vec<f64>> = picks.iter().map(|p| oracle::load(p, experts)).collect();
            layerwise_q = Some(LayerwiseQuality {
                ppl: f64::NAN,
                matches_layer_oracle: mean(&|l| oracle::agreement(&picks[l], &layer_best[l])),
                locality: mean(&|l| oracle::locality(&picks[l])),
                load: (0..experts).map(|e| mean(&|l| loads[l][e])).collect(),
            });
        }
        q.push(Quality {
            domain: name.clone(),
            tokens,
            dense,
            experts: vec![],
            oracle: f64::NAN,
            pruned: f64::NAN,
            oracle_is_own: own(&load, d),
            oracle_locality: oracle::locality(&best),
            oracle_load: load,
            layer_oracle_locality: layer_best.iter().map(|b| oracle::locality(b)).sum::<f64>() / split.layers() as f64,
            router: None,
            layerwise: layerwise_q,
        });
        oracles.push((best, layer_best));
    }
    let mut shares = RouterShares::default();
    ffn::with_moe(model, split, |model| -> Result<()> {
        for ((qd, rows), (best, _)) in q.iter_mut().zip(held).zip(&oracles) {
            for e in 0..experts {
                qd.experts.push(ppl(model, rows, Some(&everyone_to(rows, e as u32)))?.0);
            }
            qd.oracle = ppl(model, rows, Some(best))?.0;
        }
        if model.pregate().is_none() {
            return Ok(());
        }
        // Its picks, for accuracy and load, before the timed runs (which route for themselves).
        let picks: Vec<Vec<Vec<u32>>> = held
            .iter()
            .map(|rows| rows.iter().map(|row| model.routes(row)).collect::<Result<_, _>>())
            .collect::<Result<_, _>>()?;
        let (before, t0) = (model.routing_seconds(), std::time::Instant::now());
        // The router routes as it does at run time: inside each step, before the blocks.
        let ppls: Vec<f64> = held.iter().map(|rows| Ok(ppl(model, rows, None)?.0)).collect::<Result<_>>()?;
        shares.pregate = Some((model.routing_seconds() - before) / t0.elapsed().as_secs_f64().max(1e-9));
        for (d, (((qd, r), p), (best, layer_best))) in q.iter_mut().zip(&picks).zip(ppls).zip(&oracles).enumerate() {
            let load = oracle::load(r, experts);
            let per_layer =
                layer_best.iter().map(|b| oracle::agreement(r, b)).sum::<f64>() / layer_best.len().max(1) as f64;
            qd.router = Some(RouterQuality {
                ppl: p,
                matches_oracle: oracle::agreement(r, best),
                matches_layer_oracle: per_layer,
                is_own: own(&load, d),
                locality: oracle::locality(r),
                load,
            });
        }
        Ok(())
    })?;
    // The layer-wise gates and pruning route without the pre-gate: off for these runs.
    let pregate = model.set_pregate(None);
    let rest = (|| -> Result<()> {
        if let Some(g) = gates {
            let ffns = layerwise::gated(model, split, g)?;
            ffn::with_ffns(model, ffns, |model| -> Result<()> {
                let t0 = std::time::Instant::now();
                for (qd, rows) in q.iter_mut().zip(held) {
                    if let Some(l) = qd.layerwise.as_mut() {
                        l.ppl = ppl(model, rows, None)?.0;
                    }
                }
                shares.layerwise = Some(model.routing_seconds() / t0.elapsed().as_secs_f64().max(1e-9));
                Ok(())
            })?;
        }
        let pruned = ExpertSplit::pruned(stats, split.keep)?;
        ffn::with_moe(model, &pruned, |model| -> Result<()> {
            for (qd, rows) in q.iter_mut().zip(held) {
                qd.pruned = ppl(model, rows, None)?.0;
            }
            Ok(())
        })
    })();
    model.set_pregate(pregate);
    rest?;
    pb.finish_and_clear();
    Ok((q, shares))
}

fn print_quality(q: &[Quality], experts: &[String]) {
    if q.is_empty() {
        return;
    }
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
    println!("held-out perplexity before training (dense / through each expert / pruned to the same size):");
    let heads: Vec<String> = experts.iter().map(|e| format!("{e:>12}")).collect();
    println!("{:>12} {:>7} {:>10} {} {:>10} {:>10}", "domain", "tokens", "dense", heads.join(" "), "oracle", "pruned");
    for d in q {
        let cells: Vec<String> = d.experts.iter().map(|p| format!("{p:>12.2}")).collect();
        println!(
            "{:>12} {:>7} {:>10.2} {} {:>10.2} {:>10.2}",
            d.domain,
            d.tokens,
            d.dense,
            cells.join(" "),
            d.oracle,
            d.pruned
        );
    }
    if q.iter().any(|d| d.router.is_some()) {
        println!("pre-gating router on the held-out rows:");
        for d in q {
            let Some(r) = &d.router else { continue };
            let load: Vec<String> = r.load.iter().map(|l| format!("{:.0}%", 100.0 * l)).collect();
            println!(
                "{:>12}: perplexity {:.2}, oracle expert {:.1}% (each layer's: {:.1}%), own expert {}, same as the previous token {:.1}%, load {}",
                d.domain,
                r.ppl,
                100.0 * r.matches_oracle,
                100.0 * r.matches_layer_oracle,
                pct(r.is_own),
                100.0 * r.locality,
                load.join("/")
            );
        }
    }
    if q.iter().any(|d| d.layerwise.is_some()) {
        println!("layer-wise gates on the held-out rows (means over the layers):");
        for d in q {
            let Some(l) = &d.layerwise else { continue };
            let load: Vec<String> = l.load.iter().map(|x| format!("{:.0}%", 100.0 * x)).collect();
            println!(
                "{:>12}: perplexity {:.2}, the layer's oracle expert {:.1}%, same as the previous token {:.1}% (oracle {:.1}%), load {}",
                d.domain,
                l.ppl,
                100.0 * l.matches_layer_oracle,
                100.0 * l.locality,
                100.0 * d.layer_oracle_locality,
                load.join("/")
            );
        }
    }
    println!("oracle experts per token (best overlap of its active channels):");
    for d in q {
        let load: Vec<String> = d.oracle_load.iter().map(|l| format!("{:.0}%", 100.0 * l)).collect();
        println!(
            "{:>12}: own expert {}, same as the previous token {:.1}%, load {}",
            d.domain,
            pct(d.oracle_is_own),
            100.0 * d.oracle_locality,
            load.join("/")
        );
    }
}

/// Trains the pre-gating router towards the oracle expert of every calibration token (all
/// domains' rows together), in the model (which is left without a router), and the layer-wise
/// gates towards each layer's own oracle expert.
fn train_routers(
    model: &mut recompose_llm::Model,
    split: &ExpertSplit,
    calib: &[Vec<Vec<u32>>],
    a: &Args,
    quiet: bool,
) -> Result<(PreGate, Option<recompose_moe::layerwise::Gates>)> {
    let rows: Vec<Vec<u32>> = calib.iter().flatten().cloned().collect();
    let experts = split.names.len();
    let pb = progress(rows.len() as u64, "oracle experts", quiet);
    let per_layer = oracle::layer_overlaps(model, split, &rows, |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let targets = oracle::best(&oracle::summed(&per_layer, experts));
    model.set_pregate(Some(router::init(model, experts, 512, 0)?));
    let pb = progress(a.router_steps as u64, "router", quiet);
    let opts = TrainOptions { steps: a.router_steps, lr: a.router_lr, batch: 8, seed: 0 };
    let losses = router::train(model, &rows, &targets, opts, |s, l| {
        pb.set_position(s as u64);
        pb.set_message(format!("router (loss {l:.3})"));
    });
    pb.finish_and_clear();
    // The trained router leaves the model frozen (its weights plain tensors again).
    let trained = model.set_pregate(None).map(|g| g.frozen(&model.config)).transpose();
    let (losses, trained) = (losses?, trained?);
    tracing::info!(
        "router: {} steps, loss {:.3} -> {:.3}",
        a.router_steps,
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN)
    );
    let trained = trained.context("the router went missing during training")?;
    if a.layerwise_steps == 0 {
        return Ok((trained, None));
    }
    let every = 8;
    let xs = recompose_moe::layerwise::inputs(model, &rows, every)?;
    let layer_targets: Vec<Vec<u32>> = (0..split.layers())
        .map(|l| {
            let best = oracle::best(&oracle::at_layer(&per_layer, l, experts));
            best.iter().flat_map(|r| r.iter().step_by(every).copied()).collect()
        })
        .collect();
    let (gates, losses) =
        recompose_moe::layerwise::train(&xs, &layer_targets, experts, a.layerwise_steps, 512, a.router_lr, 0)?;
    tracing::info!(
        "layer-wise gates: {} steps, loss {:.3} -> {:.3}",
        a.layerwise_steps,
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN)
    );
    Ok((trained, Some(gates)))
}

/// The fine-tuned weights of each model (None: not fine-tuned, or no such model).
#[derive(Default)]
struct Trained {
    moe: Option<Weights>,
    layerwise: Option<Weights>,
    pruned: Option<Weights>,
}

/// Fine-tunes the MoE's experts (router frozen), the layer-wise MoE's (gates frozen) and the
/// pruned model with the same steps on the same rows, in f32, and scores them and the dense
/// model on the held-out rows.
#[allow(clippy::too_many_arguments)]
fn finetune<'g>(
    a: &Args,
    texts: &[Vec<u32>],
    identity: &str,
    split: &ExpertSplit,
    pruned: &ExpertSplit,
    router: &PreGate,
    gates: Option<&'g recompose_moe::layerwise::Gates>,
    held: &[Vec<Vec<u32>>],
    quiet: bool,
) -> Result<(Finetuned, Trained)> {
    use recompose_moe::Routing;
    use recompose_train::finetune::Paths;
    crate::cmd::finetune::keep_freed_memory();
    anyhow::ensure!(a.finetune_batch > 0 && a.finetune_lr > 0.0, "--finetune-batch and --finetune-lr must be positive");
    let mut rows = vec![];
    for (name, ids) in a.calib.iter().zip(texts) {
        rows.extend(domains::cut(name, ids, a.ctx, a.finetune_rows)?.calib);
    }
    let train = recompose_moe::finetune::dataset(&rows, "calibration domains");
    let held_all: Vec<Vec<u32>> = held.iter().flatten().cloned().collect();
    anyhow::ensure!(!held_all.is_empty(), "fine-tuning is scored on held-out rows: --eval-rows must be at least 1");
    let held_set = recompose_moe::finetune::dataset(&held_all, "held-out rows");
    let steps = a.finetune_steps;
    let cfg = recompose_moe::finetune::config(steps, a.finetune_batch, a.finetune_lr);
    let f32_args = crate::common::ModelArgs { f32: true, moe: None, ..a.model.clone() };
    let ppl = |model: &recompose_llm::Model| -> Result<Vec<f64>> {
        held.iter().map(|rows| Ok(recompose_moe::quality::held_out_nll(model, rows, None)?.0.exp())).collect()
    };
    let mut dense_f32 = vec![];
    // Each run loads the base afresh (f32) and cuts it under `split`, routed by `routing`.
    let mut run_one = |what: &str,
                       split: &ExpertSplit,
                       routing: &dyn Fn(&recompose_llm::Model) -> Result<Routing<'g>>|
     -> Result<(Vec<f64>, (f64, f64), Weights)> {
        let (_, mut model, _) = f32_args.load_base()?;
        if dense_f32.is_empty() {
            // The dense model in f32, scored before its FFNs are cut.
            dense_f32 = ppl(&model)?;
        }
        let routing = routing(&model)?;
        let pb = progress(steps as u64, &format!("fine-tuning ({what})"), quiet);
        let mut obs = crate::cmd::finetune::Progress { pb, quiet };
        let paths = Paths::beside(&a.output.join(format!("finetune-{what}")));
        let (summary, weights) = recompose_moe::finetune::run(
            &mut model, identity, split, routing, &train, &held_set, &cfg, &paths, &mut obs,
        )?;
        obs.pb.finish_and_clear();
        let run =
            (summary.first_eval.map_or(f64::NAN, |e| e.eval_ppl), summary.last_eval.map_or(f64::NAN, |e| e.eval_ppl));
        tracing::info!("{what}: held-out perplexity {:.2} -> {:.2} in {steps} steps", run.0, run.1);
        Ok((ppl(&model)?, run, weights))
    };
    let (moe_ppl, moe_run, moe_w) = run_one("moe", split, &|m| Ok(Routing::PreGate(router.frozen(&m.config)?)))?;
    let layerwise = gates.map(|g| run_one("layerwise", split, &|_| Ok(Routing::Layerwise(g)))).transpose()?;
    let (pruned_ppl, pruned_run, pruned_w) = run_one("pruned", pruned, &|_| Ok(Routing::None))?;
    let report = Finetuned {
        steps,
        tokens: steps * a.finetune_batch * (a.ctx - 1),
        domains: a.calib.clone(),
        dense_f32,
        moe: moe_ppl,
        layerwise: layerwise.as_ref().map(|l| l.0.clone()),
        pruned: pruned_ppl,
        moe_run,
        layerwise_run: layerwise.as_ref().map(|l| l.1),
        pruned_run,
    };
    let trained = Trained { moe: Some(moe_w), layerwise: layerwise.map(|l| l.2), pruned: Some(pruned_w) };
    Ok((report, trained))
}

/// Trained weights by name.
type Weights = Vec<(String, candle_core::Tensor)>;
