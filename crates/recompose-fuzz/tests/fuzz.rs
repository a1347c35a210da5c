//! Short fuzz runs, one test per target (5 s each; RECOMPOSE_FUZZ_SECS and RECOMPOSE_FUZZ_SEED
//! change them), and a replay of every committed corpus and crash input.

use recompose_fuzz::{find, fuzz, replay, Options, TARGETS};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// One run at a time: in parallel they would share the cores, and a slow but bounded input
/// (a fuel-limited chat template takes seconds) could pass its hang bound.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[global_allocator]
static GUARD: recompose_fuzz::alloc::Guard = recompose_fuzz::alloc::Guard;

fn env<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok()?.parse().ok()
}

fn options() -> Options {
    Options {
        secs: env("RECOMPOSE_FUZZ_SECS").unwrap_or(5.0),
        seed: env("RECOMPOSE_FUZZ_SEED").unwrap_or(0),
        findings: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings"),
        ..Options::default()
    }
}

fn short_run(name: &str) {
    let _one = one_at_a_time();
    let report = fuzz(find(name).expect("a target"), &options());
    eprintln!("{report}");
    assert!(report.seeds > 0, "{name} has no seeds");
    assert!(report.findings.is_empty(), "{report}");
}

macro_rules! short_runs {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { short_run(stringify!($name)) })*
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

short_runs!(gguf, safetensors, safetensors_index, merge_yaml, kv_spec, request, chat_content, chat_template);

#[test]
fn every_target_has_a_short_run() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(names, TESTED);
}

#[test]
fn corpus_and_crash_inputs_replay_cleanly() {
    let _one = one_at_a_time();
    let opts = options();
    let findings: Vec<String> =
        TARGETS.iter().flat_map(|t| replay(t, &t.seeds(), &opts)).map(|f| f.to_string()).collect();
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}
