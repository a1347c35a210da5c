//! The fuzz loop: seeds first, then mutants of the corpus, each run on a worker thread under
//! `catch_unwind` with a wall-time bound. An input joins the in-memory corpus when its outcome
//! (error message with numbers and quoted names left out, output size class) is new. Panics and
//! hangs are findings, saved to disk. Owns no target and no mutation.

use crate::mutate::Mutator;
use crate::targets::{Scratch, Target};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

/// Inputs kept beyond the seeds; past it, new outcomes are still counted but not kept.
const MAX_CORPUS: usize = 4096;
/// A run stops after this many distinct crashes: more are usually one bug seen many ways.
const MAX_FINDINGS: usize = 16;

#[derive(Debug, Clone)]
pub struct Options {
    /// Mutation time, after the seeds have run.
    pub secs: f64,
    pub seed: u64,
    /// An input still running after this is a hang.
    pub timeout: Duration,
    /// Findings go to `<findings>/<target>/`.
    pub findings: PathBuf,
    /// Print a status line every 30 s.
    pub progress: bool,
    /// Print each outcome that made an input join the corpus (to see what counts as new).
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            secs: 5.0,
            seed: 0,
            timeout: Duration::from_secs(2),
            findings: PathBuf::from("target/fuzz-findings"),
            progress: false,
            verbose: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Crash,
    Hang,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: Kind,
    pub detail: String,
    /// Where the input is (None if it could not be saved).
    pub input: Option<PathBuf>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let kind = match self.kind {
            Kind::Crash => "CRASH",
            Kind::Hang => "HANG",
        };
        match &self.input {
            Some(p) => write!(f, "{kind} {}: {}", p.display(), self.detail),
            None => write!(f, "{kind} (input not saved): {}", self.detail),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub execs: u64,
    pub elapsed: Duration,
    pub seeds: usize,
    /// Mutants added to the corpus for a new outcome.
    pub kept: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}: {} execs in {:.1} s ({:.0}/s), {} seeds, {} kept, {} findings",
            self.target,
            self.execs,
            self.elapsed.as_secs_f64(),
            self.execs_per_sec(),
            self.seeds,
            self.kept,
            self.findings.len()
        )?;
        self.findings.iter().try_for_each(|x| write!(f, "\n  {x}"))
    }
}

/// FNV-1a: a stable hash for file names and outcome fingerprints.
fn fnv(bytes: &[u8]) -> u64 {
    fnv_more(0xcbf2_9ce4_8422_2325, bytes)
}

fn fnv_more(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Runs of letters, digits and `_`.
fn tokens(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    b.split(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).filter(|w| !w.is_empty())
}

/// What one part of an outcome says, without what it repeats of the input: only its words
/// outside quotes count, a word being a token of three or more letters (no digit: numbers and
/// hex codes vary, `is`/`of` say little) that is not the input's. So an outcome is new when the
/// reader took another path, not when it echoed another offset or garbage key, which would fill
/// the corpus with near-copies.
fn fingerprint(part: &str, echoed: &HashSet<&[u8]>) -> u64 {
    let mut unquoted = Vec::with_capacity(part.len());
    let (mut quote, mut prev) = (None, b' ');
    for &c in part.as_bytes() {
        match quote {
            // An escaped quote inside quotes closes nothing.
            Some(_) if prev == b'\\' => {
                prev = b' ';
                continue;
            }
            // A space for the quoted text, so the words around it stay apart.
            Some(q) if c == q => {
                quote = None;
                unquoted.push(b' ');
            }
            Some(_) => {}
            // An apostrophe inside a word ("don't") opens nothing.
            None if matches!(c, b'\'' | b'"' | b'`') && !prev.is_ascii_alphanumeric() => quote = Some(c),
            None => unquoted.push(c),
        }
        prev = c;
    }
    let words = tokens(&unquoted).filter(|w| w.len() >= 3 && !w.iter().any(u8::is_ascii_digit));
    let mut h = fnv(b"");
    let mut last: &[u8] = b"";
    for w in words.filter(|w| !echoed.contains(w)).take(64) {
        if w != last {
            h = fnv_more(fnv_more(h, w), b" ");
            last = w;
        }
    }
    h
}

/// Records an outcome (one part per reader the target called); true if any part is new. Parts
/// count one by one: their combinations would multiply without end.
fn novel(seen: &mut HashSet<u64>, outcome: &[String], input: &[u8]) -> bool {
    let mut echoed: HashSet<&[u8]> = HashSet::new();
    for w in tokens(input) {
        echoed.insert(w);
        // Readers often quote a field cut short (a length that was changed), so long starts and
        // ends of input tokens count as the input's too.
        let w = &w[..w.len().min(64)];
        for k in 1..w.len().saturating_sub(4) {
            echoed.insert(&w[k..]);
            echoed.insert(&w[..w.len() - k]);
        }
    }
    let mut new = false;
    for (i, part) in outcome.iter().enumerate() {
        new |= seen.insert(fingerprint(part, &echoed) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    new
}

/// Saves a finding's input as `<dir>/<kind>-<hash>`, with what happened in `<kind>-<hash>.log`.
pub fn save(dir: &Path, kind: &str, input: &[u8], detail: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    std::fs::write(&path, input)?;
    std::fs::write(path.with_extension("log"), format!("{detail}\n"))?;
    Ok(path)
}

thread_local! {
    static IN_TARGET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<Panic>> = const { RefCell::new(None) };
}

/// Where a target panicked (the crash's identity) and what it said.
#[derive(Debug, Clone)]
struct Panic {
    at: String,
    message: String,
}

impl fmt::Display for Panic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "panicked at {}: {}", self.at, self.message)
    }
}

/// Panics inside a target are recorded silently (a fuzz run would otherwise print thousands);
/// every other panic goes to the hook that was there before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !IN_TARGET.get() {
                return previous(info);
            }
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            LAST_PANIC.set(Some(Panic { at, message: message.replace('\n', " ") }));
        }));
    });
}

enum Outcome {
    Done(Vec<String>),
    Panicked(Panic),
    Hung,
}

/// A thread that runs inputs one at a time. A hung one cannot be stopped: it is abandoned
/// (with its scratch folder) and a new worker takes over.
struct Worker {
    /// None once dropping: the thread's loop ends when the channel closes.
    inputs: Option<mpsc::Sender<Arc<[u8]>>>,
    outcomes: mpsc::Receiver<Result<Vec<String>, Panic>>,
    /// Joined on drop, unless hung, so the scratch folder is removed before the process exits.
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn start(target: &'static Target, findings: &'static Path) -> std::io::Result<Self> {
        install_panic_hook();
        let scratch = Scratch::new(target)?;
        // Outcomes name files relative to the scratch folder, whose name is random.
        let prefix = format!("{}/", scratch.path().display());
        let (inputs, rx) = mpsc::channel::<Arc<[u8]>>();
        let (tx, outcomes) = mpsc::channel();
        let thread = thread::Builder::new().name(format!("fuzz-{}", target.name)).spawn(move || {
            for input in rx {
                crate::alloc::running(Some((&input, findings)));
                LAST_PANIC.take();
                IN_TARGET.set(true);
                let r = panic::catch_unwind(AssertUnwindSafe(|| {
                    (target.run)(&scratch, &input).into_iter().map(|s| s.replace(&prefix, "")).collect::<Vec<_>>()
                }));
                IN_TARGET.set(false);
                crate::alloc::running(None);
                let r = r.map_err(|_| {
                    LAST_PANIC.take().unwrap_or(Panic { at: "?".into(), message: "(no panic hook)".into() })
                });
                if tx.send(r).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { inputs: Some(inputs), outcomes, thread: Some(thread) })
    }

    fn run(&mut self, input: Arc<[u8]>, timeout: Duration) -> Outcome {
        let gone = || Outcome::Panicked(Panic { at: "worker".into(), message: "the worker thread died".into() });
        if self.inputs.as_ref().is_none_or(|i| i.send(input).is_err()) {
            return gone();
        }
        match self.outcomes.recv_timeout(timeout) {
            Ok(Ok(s)) => Outcome::Done(s),
            Ok(Err(p)) => Outcome::Panicked(p),
            Err(RecvTimeoutError::Timeout) => {
                self.thread = None;
                Outcome::Hung
            }
            Err(RecvTimeoutError::Disconnected) => gone(),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.inputs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The findings folder of a target, kept for the life of the process (workers and the
/// allocation guard hold it).
fn findings_dir(target: &Target, opts: &Options) -> &'static Path {
    Box::leak(opts.findings.join(target.name).into_boxed_path())
}

fn no_worker(e: std::io::Error) -> Finding {
    Finding { kind: Kind::Crash, detail: format!("could not start a worker: {e}"), input: None }
}

/// The run's hang bound, or the target's own if longer.
fn hang_bound(target: &Target, opts: &Options) -> Duration {
    target.timeout.map_or(opts.timeout, |t| t.max(opts.timeout))
}

fn hang_detail(timeout: Duration) -> String {
    format!("still running after {:.1} s", timeout.as_secs_f64())
}

/// Fuzzes `target` from its seeds for `opts.secs`. Stops early at the first hang (its thread
/// keeps a core busy until the process ends) or after [`MAX_FINDINGS`] distinct crashes.
pub fn fuzz(target: &'static Target, opts: &Options) -> Report {
    let start = Instant::now();
    let dir = findings_dir(target, opts);
    let mut corpus: Vec<Vec<u8>> = target.seeds().into_iter().map(|(_, d)| d).collect();
    let seeds = corpus.len();
    if corpus.is_empty() {
        corpus.push(vec![]);
    }
    let mut report =
        Report { target: target.name, execs: 0, elapsed: Duration::ZERO, seeds, kept: 0, findings: vec![] };
    let mut worker = match Worker::start(target, dir) {
        Ok(w) => w,
        Err(e) => {
            report.findings.push(no_worker(e));
            return report;
        }
    };
    let timeout = hang_bound(target, opts);
    let mut mutator = Mutator::new(opts.seed, target.format, target.dict, target.max_len);
    let mut seen = HashSet::new();
    let mut crashes = HashSet::new();
    let mut deadline = None;
    let mut last_progress = Instant::now();
    let unmutated = corpus.len();
    for i in 0.. {
        // The seeds run unmutated first; the clock starts after them.
        let input: Arc<[u8]> = if i < unmutated {
            corpus[i].clone().into()
        } else {
            let end = *deadline
                .get_or_insert_with(|| Instant::now() + Duration::try_from_secs_f64(opts.secs).unwrap_or_default());
            if Instant::now() >= end {
                break;
            }
            let mut d = corpus[mutator.rng().below(corpus.len())].clone();
            mutator.mutate(&mut d, &corpus);
            d.into()
        };
        report.execs += 1;
        match worker.run(input.clone(), timeout) {
            Outcome::Done(s) => {
                if novel(&mut seen, &s, &input) && i >= unmutated && corpus.len() < unmutated + MAX_CORPUS {
                    if opts.verbose {
                        eprintln!("new outcome: {s:?}");
                    }
                    corpus.push(input.to_vec());
                    report.kept += 1;
                }
            }
            Outcome::Panicked(p) => {
                if crashes.insert(p.at.clone()) {
                    let detail = p.to_string();
                    let input = save(dir, "crash", &input, &detail).ok();
                    report.findings.push(Finding { kind: Kind::Crash, detail, input });
                }
            }
            Outcome::Hung => {
                let detail = hang_detail(timeout);
                let input = save(dir, "hang", &input, &detail).ok();
                report.findings.push(Finding { kind: Kind::Hang, detail, input });
                break;
            }
        }
        if report.findings.len() >= MAX_FINDINGS {
            break;
        }
        if opts.progress && last_progress.elapsed() >= Duration::from_secs(30) {
            last_progress = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            let (name, execs, found) = (target.name, report.execs, report.findings.len());
            eprintln!(
                "{name}: {secs:.0} s, {execs} execs ({:.0}/s), corpus {}, {found} findings",
                execs as f64 / secs,
                corpus.len()
            );
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// Runs each file once, unmutated: the regression check over committed corpora and crashes.
/// Findings name the file itself; nothing is saved (but see [`crate::alloc`]).
pub fn replay(target: &'static Target, files: &[(PathBuf, Vec<u8>)], opts: &Options) -> Vec<Finding> {
    let dir = findings_dir(target, opts);
    let timeout = hang_bound(target, opts);
    let mut out = vec![];
    let mut worker = None;
    for (path, data) in files {
        let mut w = match worker.take().map_or_else(|| Worker::start(target, dir), Ok) {
            Ok(w) => w,
            Err(e) => {
                out.push(no_worker(e));
                return out;
            }
        };
        let input = Some(path.clone());
        match w.run(data.as_slice().into(), timeout) {
            Outcome::Done(_) => worker = Some(w),
            Outcome::Panicked(p) => {
                let detail = p.to_string();
                out.push(Finding { kind: Kind::Crash, detail, input });
                worker = Some(w);
            }
            // The next file gets a fresh worker.
            Outcome::Hung => out.push(Finding { kind: Kind::Hang, detail: hang_detail(timeout), input }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_of_an_outcome_counts_alone() {
        let mut seen = HashSet::new();
        let mut novel = |parts: [&str; 2]| novel(&mut seen, &parts.map(String::from), b"");
        assert!(novel(["fine", "bad magic"]));
        assert!(novel(["bad key", "fine"]));
        assert!(!novel(["fine", "fine"]));
        assert!(!novel(["bad key", "bad magic"]));
    }

    #[test]
    fn fingerprints_ignore_numbers_and_what_the_input_says() {
        let f = |outcome: &str, input: &str| {
            let mut seen = HashSet::new();
            novel(&mut seen, &[outcome.to_string()], input.as_bytes());
            seen.into_iter().next()
        };
        assert_eq!(f("ends at byte 12 reading 'a.b'", "a.b"), f("ends at byte 7 reading 'x'", "x"));
        assert_eq!(f("no key (like recent=abc)", "abc"), f("no key (like recent=xyz)", "xyz"));
        assert_ne!(f("no key (like recent=abc)", ""), f("no key (like recent=xyz)", ""));
        assert_eq!(f("unknown field `x`, expected `a`", ""), f("unknown field `y`, expected `b`", ""));
        assert_eq!(f("needs a key: ab_`x`cd", "ab_ cd"), f("needs a key: ef_`y`gh", "ef_ gh"));
        assert_eq!(f(r#"type: string "a\"b\nc""#, ""), f(r#"type: string "x""#, ""));
        assert_eq!(f(r"no key (like recent=a\soriginal)", r"a\soriginal"), f("no key (like recent=b)", "b"));
        assert_eq!(f("key 'a' is layer_norm_r", "layer_norm_rms"), f("key 'b' is orm_rms", "layer_norm_rms"));
        assert_ne!(f("ends at byte 12", ""), f("bad magic", ""));
    }
}
