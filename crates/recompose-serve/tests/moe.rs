//! A Read-ME MoE behind the server's scheduler: requests batched together (prompts chunked into
//! decode steps, tokens of different experts in one step, a shared prefix from the cache) give
//! what each gives alone through `generate`. The router's keys live in the cache as one more
//! layer, so the prefix cache carries them too.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_kv::KvSpec;
use recompose_llm::batching::Batching;
use recompose_llm::generate::{generate, Batcher, GenerateOptions, Sequence, StepPolicy, TokenBudget};
use recompose_llm::{Model, WeightMode};
use recompose_serve::engine::{Engine, EngineConfig, Event, Job};
use std::sync::Arc;
use std::time::Instant;

/// The tiny model with a 3-expert MoE applied: a seeded split and a router whose picks vary
/// (`recompose_moe::testing`).
fn tiny_moe() -> (tempfile::TempDir, Model, recompose_core::Tokenizer) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    let dtype = candle_core::quantized::GgmlDType::Q8_0;
    write_tiny_gguf(&p, &TinySpec { seed: 6, dtype, ..Default::default() }).unwrap();
    let f = ModelFile::open(&p).unwrap();
    let mut model = Model::load(&f, WeightMode::Quantized).unwrap();
    recompose_moe::testing::moe(&f, &model, None).unwrap().apply(&mut model).unwrap();
    (d, model, f.tokenizer().unwrap())
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| 3 + (i * 11 + salt * 17) % 200).collect()
}

#[test]
fn batched_moe_requests_match_each_alone_with_a_cached_prefix() {
    let (_d, model, tok) = tiny_moe();
    let tok = Arc::new(tok);
    let cfg = EngineConfig {
        max_batch: 4,
        max_queue: 16,
        budget: TokenBudget { busy: 8, idle: 16 },
        prefix_cache: Some(64 << 20),
        on_idle: None,
        external_metrics: vec![],
        policy: Default::default(),
    };
    let (engine, _thread) = Engine::start(model, tok.clone(), cfg).unwrap();
    let opts = GenerateOptions { max_tokens: 10, ..Default::default() };
    let system = prompt(40, 9);
    let with = |salt: u32, n: usize| -> Vec<u32> { system.iter().copied().chain(prompt(n, salt)).collect() };
    let prompts = vec![with(1, 5), prompt(30, 2), with(3, 9), prompt(3, 4), with(5, 2)];
    let mut rxs = vec![];
    for p in &prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job =
            Job { prompt: p.clone(), opts: opts.clone(), kv: KvSpec::default(), events: tx, arrived: Instant::now() };
        engine.submit(job).unwrap();
        rxs.push(rx);
    }
    let (_d2, alone_model, _) = tiny_moe();
    let layout = alone_model.cache_layout();
    assert_eq!(layout.num_layers, alone_model.layers.len() + 1, "the router's cache layer");
    let mut cached_any = false;
    for (i, (p, rx)) in prompts.iter().zip(rxs.iter_mut()).enumerate() {
        let mut text = String::new();
        let (finish, n, cached) = loop {
            match rx.blocking_recv().expect("the scheduler dropped a request") {
                Event::Text { text: t, .. } => text.push_str(&t),
                Event::Done { finish, completion_tokens, cached_tokens, .. } => {
                    break (finish, completion_tokens, cached_tokens)
                }
                Event::Error(e) => panic!("request {i} failed: {e}"),
            }
        };
        cached_any |= cached > 0;
        let spec = KvSpec::default();
        let (g, _) =
            generate(&alone_model, &tok, &[p.clone()], &opts, |n| spec.build(&layout, &[n]), |_, _| {}).unwrap();
        assert_eq!((text, finish, n), (g[0].text.clone(), g[0].finish, g[0].tokens.len()), "request {i}");
    }
    assert!(cached_any, "no request took the shared prefix from the cache");
}

/// Each batching policy with a step of 3 of 8 running requests, the router run ahead of the
/// backbone: every request gives its text alone, and expert-aware batching's steps need fewer
/// distinct experts than decode-first's on the same requests.
#[test]
fn a_step_of_fewer_rows_than_running_gives_each_text_alone_and_expert_batching_fewer_experts() {
    let (_d, model, tok) = tiny_moe();
    let layout = model.cache_layout();
    let opts = GenerateOptions { max_tokens: 12, ..Default::default() };
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(3 + 4 * i, i as u32 + 1)).collect();
    let spec = KvSpec::default();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            generate(&model, &tok, &[p.clone()], &opts, |n| spec.build(&layout, &[n]), |_, _| {}).unwrap().0[0]
                .text
                .clone()
        })
        .collect();
    let mut experts = vec![];
    for batching in Batching::ALL {
        let policy = StepPolicy { batching, max_rows: 3, max_wait: 6 };
        let mut b = Batcher::new(TokenBudget { busy: 8, idle: 16 }).with_policy(policy);
        let ids: Vec<_> = prompts
            .iter()
            .map(|p| {
                let seq = Sequence::new(p.clone(), opts.clone(), model.config.max_position).unwrap();
                b.add(seq, spec.build(&layout, &[p.len()])).unwrap()
            })
            .collect();
        let (mut sum, mut steps) = (0, 0);
        while ids.iter().any(|&id| b.get(id).unwrap().finish().is_none()) {
            b.step(&model, &tok).unwrap();
            assert!(b.last_step_experts() >= 1 && b.last_step_tokens() >= 1);
            sum += b.last_step_experts();
            steps += 1;
        }
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(b.get(id).unwrap().text(), alone[i], "{} request {i}", batching.name());
        }
        experts.push(sum as f64 / steps as f64);
    }
    assert!(experts[2] < experts[0], "experts per step: expert-aware {} vs decode-first {}", experts[2], experts[0]);
}
