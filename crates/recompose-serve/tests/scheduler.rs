//! The scheduler in-process, with a tiny model: requests batched together (prompts chunked and
//! mixed into decode steps, different KV policies side by side) give what each gives alone;
//! stop strings are never streamed in part; the queue bound, cancellation and draining behave.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::generate::{generate, FinishReason, GenerateOptions, TokenBudget};
use recompose_llm::{Model, WeightMode};
use recompose_serve::engine::{Engine, EngineConfig, Event, Job};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

fn tiny() -> (tempfile::TempDir, Model, Tokenizer) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    write_tiny_gguf(&p, &TinySpec { seed: 5, ..Default::default() }).unwrap();
    let f = ModelFile::open(&p).unwrap();
    let (m, t) = (Model::load(&f, WeightMode::Quantized).unwrap(), f.tokenizer().unwrap());
    (d, m, t)
}

fn start(budget: TokenBudget, max_batch: usize, max_queue: usize) -> (tempfile::TempDir, Engine, Arc<Tokenizer>) {
    start_with(budget, max_batch, max_queue, None)
}

fn start_with(
    budget: TokenBudget,
    max_batch: usize,
    max_queue: usize,
    prefix_cache: Option<usize>,
) -> (tempfile::TempDir, Engine, Arc<Tokenizer>) {
    let (d, model, tok) = tiny();
    let tok = Arc::new(tok);
    let cfg = EngineConfig {
        max_batch,
        max_queue,
        budget,
        prefix_cache,
        on_idle: None,
        external_metrics: vec![],
        policy: Default::default(),
    };
    let (engine, _thread) = Engine::start(model, tok.clone(), cfg).unwrap();
    (d, engine, tok)
}

fn job(prompt: Vec<u32>, opts: GenerateOptions, kv: &str) -> (Job, UnboundedReceiver<Event>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Job { prompt, opts, kv: kv.parse::<KvSpec>().unwrap(), events: tx, arrived: Instant::now() }, rx)
}

/// Waits for a request's events: its text, finish and completion tokens.
fn collect(rx: &mut UnboundedReceiver<Event>) -> (String, FinishReason, usize) {
    let (text, finish, n, _) = collect_cached(rx);
    (text, finish, n)
}

/// `collect`, and how many prompt tokens came from the prefix cache.
fn collect_cached(rx: &mut UnboundedReceiver<Event>) -> (String, FinishReason, usize, usize) {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("the scheduler dropped a request") {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done { finish, completion_tokens, cached_tokens, .. } => {
                return (text, finish, completion_tokens, cached_tokens)
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| 3 + (i * 7 + salt * 13) % 200).collect()
}

/// What `generate` gives for one prompt alone, with the policy `kv`.
fn alone(p: &[u32], opts: &GenerateOptions, kv: &str) -> (String, FinishReason, usize) {
    let (_d, model, tok) = tiny();
    let spec: KvSpec = kv.parse().unwrap();
    let layout = model.cache_layout();
    let (g, _) = generate(&model, &tok, &[p.to_vec()], opts, |n| spec.build(&layout, &[n]), |_, _| {}).unwrap();
    (g[0].text.clone(), g[0].finish, g[0].tokens.len())
}

#[test]
fn batched_requests_with_chunked_prompts_match_each_alone() {
    // A budget of 8 tokens per step: the long prompts go in over many steps, mixed with the
    // decode tokens of the requests already streaming.
    let (_d, engine, _tok) = start(TokenBudget { busy: 8, idle: 16 }, 4, 16);
    let opts = GenerateOptions { max_tokens: 12, ..Default::default() };
    let cases: Vec<(Vec<u32>, &str)> = vec![
        (prompt(5, 1), "full"),
        (prompt(70, 2), "full"),
        (prompt(33, 3), "window:16"),
        (prompt(2, 4), "full"),
        (prompt(90, 5), "h2o:24"),
        (prompt(17, 6), "full"),
    ];
    let mut rxs = vec![];
    for (p, kv) in &cases {
        let (j, rx) = job(p.clone(), opts.clone(), kv);
        engine.submit(j).unwrap();
        rxs.push(rx);
    }
    for (i, ((p, kv), rx)) in cases.iter().zip(rxs.iter_mut()).enumerate() {
        let got = collect(rx);
        assert_eq!(got, alone(p, &opts, kv), "request {i} ({kv}, {} prompt tokens)", p.len());
    }
}

#[test]
fn stop_strings_are_never_streamed_in_part() {
    let (_d, engine, _tok) = start(TokenBudget::default(), 4, 16);
    // A prompt on which the random model writes a dozen characters or more (many byte tokens
    // are pieces of characters, which never show).
    let (p, free) = (0..64)
        .map(|salt| prompt(9, salt))
        .map(|p| {
            let free = alone(&p, &GenerateOptions { max_tokens: 40, ..Default::default() }, "full").0;
            (p, free)
        })
        .find(|(_, f)| f.chars().count() > 12)
        .expect("no prompt made the tiny model write text");
    // A stop string from the middle of the free-running text.
    let chars: Vec<(usize, char)> = free.char_indices().collect();
    let (a, b) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = free[a..b].to_string();
    let cut = free.find(&stop).unwrap();
    let opts = GenerateOptions { max_tokens: 40, stop: vec![stop.clone()], ..Default::default() };
    let (j, mut rx) = job(p.clone(), opts.clone(), "full");
    engine.submit(j).unwrap();
    let (text, finish, _) = collect(&mut rx);
    assert_eq!(text, free[..cut], "streamed text with stop {stop:?}");
    assert_eq!(finish, FinishReason::Stop);
    // `generate` streams the same: it used to print the start of a stop string.
    let (_d, model, tok) = tiny();
    let mut streamed = String::new();
    generate(&model, &tok, &[p], &opts, |_| Box::new(model.new_cache(1)), |_, t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, free[..cut]);
}

#[test]
fn a_full_queue_rejects_and_a_cancelled_request_frees_its_place() {
    let (_d, engine, _tok) = start(TokenBudget::default(), 1, 1);
    let long = GenerateOptions { max_tokens: 200, ignore_eos: true, ..Default::default() };
    let (a, mut rx_a) = job(prompt(4, 1), long.clone(), "full");
    engine.submit(a).unwrap();
    // A streams: the batch (of one) is full, so B waits in the queue (of one) and C is refused.
    assert!(matches!(rx_a.blocking_recv(), Some(Event::Text { .. })));
    let (b, mut rx_b) = job(prompt(4, 2), GenerateOptions { max_tokens: 3, ..Default::default() }, "full");
    engine.submit(b).unwrap();
    let (c, _rx_c) = job(prompt(4, 3), long, "full");
    assert!(engine.submit(c).is_err(), "a third request fit a batch of one and a queue of one");
    // Dropping A's receiver cancels it; B then runs to completion.
    drop(rx_a);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (_, finish, n) = collect(&mut rx_b);
    assert!(Instant::now() < deadline);
    assert_eq!((finish, n), (FinishReason::Length, 3));
}

#[test]
fn a_draining_engine_takes_no_new_requests() {
    let (_d, engine, _tok) = start(TokenBudget::default(), 2, 4);
    engine.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    let (j, _rx) = job(prompt(4, 1), GenerateOptions::default(), "full");
    assert!(engine.submit(j).is_err());
}

/// A shared system prompt followed by a request of its own.
fn with_prefix(prefix: &[u32], salt: u32, len: usize) -> Vec<u32> {
    prefix.iter().copied().chain(prompt(len, salt)).collect()
}

#[test]
fn a_cached_prefix_gives_the_outputs_of_a_full_prefill() {
    let (_d, engine, _tok) = start_with(TokenBudget { busy: 16, idle: 32 }, 4, 16, Some(64 << 20));
    let opts = GenerateOptions { max_tokens: 10, ..Default::default() };
    let system = prompt(100, 9);
    let run = |p: &[u32]| {
        let (j, mut rx) = job(p.to_vec(), opts.clone(), "full");
        engine.submit(j).unwrap();
        collect_cached(&mut rx)
    };
    let a = with_prefix(&system, 1, 7);
    let (text, finish, n, cached) = run(&a);
    assert_eq!(cached, 0, "the first request found a prefix in an empty cache");
    assert_eq!((text, finish, n), alone(&a, &opts, "full"));
    // The same system prompt, another question: the system prompt comes from the cache.
    let b = with_prefix(&system, 2, 5);
    let (text, finish, n, cached) = run(&b);
    assert!(cached >= system.len(), "only {cached} of the {} shared tokens were reused", system.len());
    assert_eq!((text, finish, n), alone(&b, &opts, "full"));
    // The same prompt again: all but its last token.
    assert_eq!(run(&a).3, a.len() - 1);
    // A bounded policy neither takes from nor adds to the prefix cache.
    let (j, mut rx) = job(with_prefix(&system, 3, 4), opts.clone(), "window:32");
    engine.submit(j).unwrap();
    let (text, finish, n, cached) = collect_cached(&mut rx);
    assert_eq!(cached, 0);
    assert_eq!((text, finish, n), alone(&with_prefix(&system, 3, 4), &opts, "window:32"));
}

#[test]
fn requests_racing_on_one_prefix_match_sequential_runs() {
    let (_d, engine, _tok) = start_with(TokenBudget { busy: 16, idle: 32 }, 8, 16, Some(64 << 20));
    let opts = GenerateOptions { max_tokens: 8, ..Default::default() };
    let system = prompt(60, 4);
    // Two waves: the first races to fill the cache, the second races to read it.
    for wave in 0..2u32 {
        let prompts: Vec<Vec<u32>> = (0..6).map(|i| with_prefix(&system, wave * 10 + i, 3 + i as usize)).collect();
        let mut rxs = vec![];
        for p in &prompts {
            let (j, rx) = job(p.clone(), opts.clone(), "full");
            engine.submit(j).unwrap();
            rxs.push(rx);
        }
        for (p, rx) in prompts.iter().zip(rxs.iter_mut()) {
            let (text, finish, n, cached) = collect_cached(rx);
            assert_eq!((text, finish, n), alone(p, &opts, "full"), "wave {wave}");
            if wave == 1 {
                assert!(cached >= system.len(), "wave 1 reused only {cached} tokens");
            }
        }
    }
}

#[test]
fn the_next_turn_of_a_conversation_reuses_the_previous_prompt() {
    let (_d, engine, _tok) = start_with(TokenBudget::default(), 4, 16, Some(64 << 20));
    let opts = GenerateOptions { max_tokens: 12, ignore_eos: true, ..Default::default() };
    let first = prompt(40, 8);
    let (j, mut rx) = job(first.clone(), opts.clone(), "full");
    engine.submit(j).unwrap();
    collect(&mut rx);
    // The reply's tokens as `generate` makes them, then a new question after them.
    let (_m, model, tok) = tiny();
    let (g, _) = generate(&model, &tok, &[first.clone()], &opts, |_| Box::new(model.new_cache(1)), |_, _| {}).unwrap();
    let second: Vec<u32> = first.iter().chain(&g[0].tokens).copied().chain(prompt(6, 9)).collect();
    let (j, mut rx) = job(second.clone(), opts.clone(), "full");
    engine.submit(j).unwrap();
    let (text, finish, n, cached) = collect_cached(&mut rx);
    // The first prompt, not the reply: the reply's KV came from the decode kernel.
    assert_eq!(cached, first.len());
    assert_eq!((text, finish, n), alone(&second, &opts, "full"));
}
