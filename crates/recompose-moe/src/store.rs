//! The expert store: a pre-gated MoE's routed experts in one file beside the MoE, read on demand
//! into a resident pool under a budget, so a model whose experts do not all fit in memory still
//! runs (Read-ME's expert offloading). The permanent channels and the router stay resident.
//!
//! - Every layer keeps at most `capacity` of its experts resident, evicted by one of the
//!   [`crate::cache`] policies. The pre-gate routes a token to one expert for all layers, so the
//!   layers' caches see the same uses and the capacity is a count of experts, as in the paper.
//! - A load is a real read: `pread` of the part's packed bytes, with `O_DIRECT` where the file
//!   system allows it (else the read pages are dropped from the page cache after each read), so
//!   the page cache does not hide what a load costs. Loads, hits, bytes and seconds are counted.
//! - With prefetch, the first layer of a step hands the step's experts (known before the blocks
//!   run) to a worker thread, which loads every layer's parts in layer order while the blocks
//!   compute; a layer waits only for its own parts. Time spent waiting is counted apart, so the
//!   share of load time hidden behind compute is measured, not assumed.
//! - Belady looks ahead over what the caller says comes next ([`ExpertStore::set_lookahead`]:
//!   the experts of the next steps, as far as the scheduler knows them) and always keeps the
//!   current step's experts; beyond what is known it evicts the least recently used.
//!
//! File: `RCMXSTO1`, a little-endian u64 index length, the JSON [`Index`], then every part's
//! three weights (gate, up, down) as the model runs them: packed ones as their quant then scale
//! arrays, f32 ones as little-endian rows; each part starts on a 4096-byte boundary (what
//! direct reads need).

use crate::cache::{ExpertCache, Use};
use crate::ffn::{part_name, MoeFfn, PROJ};
use crate::{Error, Result};
use recompose_core::config::Activation;
use recompose_llm::ffn::DenseFfn;
use recompose_llm::kernels::quant::{Kind, PackedWeight};
use recompose_llm::linear::{Linear, Weight};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

const MAGIC: &[u8; 8] = b"RCMXSTO1";
/// Part alignment on disk (and of the read buffers): direct I/O's block size.
const ALIGN: usize = 4096;
/// An index larger than this is not one of ours (a 7B model's is about 100 KB).
const MAX_INDEX: u64 = 64 << 20;

/// The file name a MoE folder's store has.
pub const FILE_NAME: &str = "experts.store";

/// One packed weight of a part.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WeightEntry {
    pub kind: String,
    pub rows: usize,
    pub cols: usize,
}

/// One expert's weights in one layer: where they lie and what they are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartEntry {
    pub layer: usize,
    pub expert: usize,
    pub offset: u64,
    /// Gate, up, down.
    pub weights: [WeightEntry; 3],
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Index {
    /// The identity of the model the MoE was made from (`format::identity`).
    pub base: String,
    pub layers: usize,
    pub experts: usize,
    pub parts: Vec<PartEntry>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Q4_0 => "q4_0",
        Kind::Q4_1 => "q4_1",
        Kind::Q8_0 => "q8_0",
    }
}

/// The kind name of an f32 weight (stored as little-endian rows, no scales).
const F32: &str = "f32";

fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "q4_0" => Kind::Q4_0,
        "q4_1" => Kind::Q4_1,
        "q8_0" => Kind::Q8_0,
        _ => return None,
    })
}

impl WeightEntry {
    /// The byte lengths of its quant and scale arrays (f32: values and none); None for a
    /// weight that does not pack (or an unknown kind).
    fn sizes(&self) -> Option<(usize, usize)> {
        if self.kind == F32 {
            return Some((self.rows.checked_mul(self.cols)?.checked_mul(4)?, 0));
        }
        PackedWeight::raw_sizes(kind_of(&self.kind)?, self.rows, self.cols)
    }
}

impl PartEntry {
    /// Bytes of its six arrays (None: a weight that does not pack).
    fn len(&self) -> Option<usize> {
        self.weights.iter().try_fold(0usize, |n, w| w.sizes().and_then(|(q, s)| n.checked_add(q)?.checked_add(s)))
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A weight as the store writes it: its entry, and its bytes made when written.
fn entry_of(l: &Linear) -> Result<WeightEntry> {
    let (kind, (rows, cols)) = match &l.weight {
        Weight::Packed(p) => (kind_name(p.kind()).to_string(), (p.rows(), p.cols())),
        Weight::Dense(t) if t.dtype() == candle_core::DType::F32 => (F32.to_string(), t.dims2()?),
        Weight::Dense(t) => {
            return Err(Error::Config(format!(
                "{}: a {:?} weight (the expert store holds f32 or packed)",
                l.name,
                t.dtype()
            )))
        }
    };
    Ok(WeightEntry { kind, rows, cols })
}

/// Writes one weight's bytes (what [`entry_of`] described).
fn put_weight(l: &Linear, put: &mut dyn FnMut(&[u8]) -> recompose_core::Result<()>) -> Result<()> {
    match &l.weight {
        Weight::Packed(p) => {
            let (q, s) = p.raw();
            put(q)?;
            put(s)?;
        }
        Weight::Dense(t) => {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            put(&bytes)?;
        }
    }
    Ok(())
}

/// Writes the routed experts of `moes` (one per layer, made for the model of identity `base`)
/// to `path`, atomically. Returns the bytes written.
pub fn write(path: &Path, base: &str, moes: &[MoeFfn]) -> Result<u64> {
    let experts = moes.first().map_or(0, MoeFfn::experts);
    let mut parts = vec![];
    let mut linears: Vec<[&Linear; 3]> = vec![];
    for (l, m) in moes.iter().enumerate() {
        if m.experts() != experts {
            return Err(Error::Config(format!("layer {l} has {} experts, layer 0 {experts}", m.experts())));
        }
        for (e, part) in
            m.resident_experts().ok_or_else(|| Error::Config("the experts are in a store already".into()))?
        {
            let w = [&part.gate, &part.up, &part.down];
            let weights = [entry_of(w[0])?, entry_of(w[1])?, entry_of(w[2])?];
            parts.push(PartEntry { layer: l, expert: e, offset: 0, weights });
            linears.push(w);
        }
    }
    // Offsets: after the header, each part on a block boundary. The index is sized with the
    // largest offsets first, so the real ones (no wider) fit the room left for it.
    let mut index = Index { base: base.to_string(), layers: moes.len(), experts, parts };
    for p in &mut index.parts {
        p.offset = u64::MAX;
    }
    let header = padded(16 + serde_json::to_vec(&index).map_err(|e| Error::Data(e.to_string()))?.len());
    let mut at = header;
    for p in &mut index.parts {
        p.offset = at as u64;
        at += padded(
            p.len().ok_or_else(|| Error::Config(format!("layer {} expert {}: does not pack", p.layer, p.expert)))?,
        );
    }
    let json = serde_json::to_vec(&index).map_err(|e| Error::Data(e.to_string()))?;
    recompose_core::atomic::write_with(path, |f| {
        let mut put =
            |b: &[u8]| f.write_all(b).map_err(|e| recompose_core::Error::Io { path: path.to_path_buf(), err: e });
        put(MAGIC)?;
        put(&(json.len() as u64).to_le_bytes())?;
        put(&json)?;
        put(&vec![0u8; header - 16 - json.len()])?;
        for (p, w) in index.parts.iter().zip(&linears) {
            for l in w {
                put_weight(l, &mut put).map_err(|e| recompose_core::Error::Unsupported(e.to_string()))?;
            }
            let n = p.len().unwrap_or(0);
            put(&vec![0u8; padded(n) - n])?;
        }
        Ok(())
    })?;
    Ok(at as u64)
}

/// Reads and checks a store's header: its index, the index's length and the file's size.
pub fn read_index(path: &Path) -> Result<(Index, u64, u64)> {
    let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
    let mut f = File::open(path).map_err(|e| bad(format!("{e} (make it with `recompose moe-store write`)")))?;
    let size = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(|_| bad("too short for an expert store".into()))?;
    if &head[..8] != MAGIC {
        return Err(bad("not an expert store".into()));
    }
    let n = u64::from_le_bytes(head[8..].try_into().map_err(|_| bad("header".into()))?);
    if n > MAX_INDEX || 16 + n > size {
        return Err(bad(format!("an index of {n} bytes in a file of {size}: corrupt")));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(|e| bad(format!("index: {e}")))?;
    let index: Index = serde_json::from_slice(&json).map_err(|e| bad(format!("a corrupt index ({e})")))?;
    Ok((index, n, size))
}

/// How much of the experts may be resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Experts per layer (the paper's cache capacity).
    Experts(usize),
    /// Bytes for all layers' resident parts together.
    Bytes(u64),
}

impl std::str::FromStr for Budget {
    type Err = String;
    /// `4` (experts), `512MiB`, `2GiB`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("expert budget `{s}`: a count of experts (4) or a size (512MiB, 2GiB)");
        let t = s.trim();
        for (suffix, unit) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if let Some(n) = t.strip_suffix(suffix) {
                let v: f64 = n.trim().parse().map_err(|_| bad())?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad());
                }
                return Ok(Budget::Bytes((v * unit as f64) as u64));
            }
        }
        match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Budget::Experts(n)),
            _ => Err(bad()),
        }
    }
}

/// How a store runs.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub budget: Budget,
    /// One of [`crate::cache::POLICIES`], or [`NO_CACHE`].
    pub policy: String,
    pub seed: u64,
    pub prefetch: bool,
}

/// The policy under which nothing stays resident between steps: every use reads its expert
/// (the on-demand baseline the caches are measured against).
pub const NO_CACHE: &str = "none";

/// What a store has done, for logs and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    pub policy: String,
    pub capacity: usize,
    pub experts: usize,
    pub prefetch: bool,
    /// Whether reads bypass the page cache (O_DIRECT); else read pages are dropped after.
    pub direct: bool,
    pub hits: u64,
    pub loads: u64,
    pub bytes_read: u64,
    /// Seconds spent reading and unpacking parts (on whichever thread did it).
    pub load_seconds: f64,
    /// Seconds the blocks spent waiting for parts (all of a load without prefetch).
    pub wait_seconds: f64,
    pub resident_bytes: u64,
}

impl StoreStats {
    pub fn hit_rate(&self) -> f64 {
        crate::cache::hit_rate(self.hits, self.loads)
    }

    /// The share of load time the blocks did not wait for.
    pub fn hidden(&self) -> f64 {
        if self.load_seconds <= 0.0 {
            0.0
        } else {
            (1.0 - self.wait_seconds / self.load_seconds).clamp(0.0, 1.0)
        }
    }
}

impl std::fmt::Display for StoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / 1048576.0;
        write!(
            f,
            "expert store: {} of {} experts resident per layer ({}{}, {} reads): hit rate {:.1}%, {} loads of {:.1} MiB in {:.2} s, waited {:.2} s ({:.0}% hidden), {:.1} MiB resident",
            self.capacity,
            self.experts,
            self.policy,
            if self.prefetch { ", prefetch" } else { "" },
            if self.direct { "direct" } else { "page-cache-dropping" },
            100.0 * self.hit_rate(),
            self.loads,
            mib(self.bytes_read),
            self.load_seconds,
            self.wait_seconds,
            100.0 * self.hidden(),
            mib(self.resident_bytes)
        )
    }
}

/// A step's parts of one layer: (expert, its part if it has one in this layer).
type Parts = Vec<(u32, Option<Arc<DenseFfn>>)>;

struct Layer {
    cache: ExpertCache,
    resident: HashMap<u32, Arc<DenseFfn>>,
    /// What the prefetcher loaded for a step, waiting for the block to take it.
    staged: Option<(u64, std::result::Result<Parts, String>)>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    loads: AtomicU64,
    bytes: AtomicU64,
    load_nanos: AtomicU64,
    wait_nanos: AtomicU64,
    resident: AtomicU64,
}

struct Inner {
    path: PathBuf,
    file: File,
    direct: bool,
    index: Index,
    /// Index of each (layer, expert)'s entry.
    at: HashMap<(usize, usize), usize>,
    /// Whether the experts are packed (else f32).
    packed: bool,
    activation: Activation,
    capacity: usize,
    policy: String,
    layers: Vec<(Mutex<Layer>, Condvar)>,
    step: AtomicU64,
    /// The experts of the steps after the current one, as far as they are known.
    lookahead: Mutex<Vec<Vec<u32>>>,
    /// The one read buffer, grown to the largest part read so far (a load reuses it rather
    /// than allocating and zeroing megabytes).
    scratch: Mutex<Vec<Page>>,
    counters: Counters,
}

pub struct ExpertStore {
    inner: Arc<Inner>,
    prefetch: Option<(mpsc::Sender<(u64, Vec<u32>)>, std::thread::JoinHandle<()>)>,
}

/// A 4096-byte aligned page: read buffers are made of these (direct reads need the alignment).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

fn page_bytes(pages: &mut [Page]) -> &mut [u8] {
    // SAFETY: `Page` is plain bytes with no padding; the slice covers exactly the pages.
    unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr() as *mut u8, std::mem::size_of_val(pages)) }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves the data as consistent as any step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExpertStore {
    /// Opens the store at `path` for a MoE made from the model of identity `base`, whose
    /// experts' activation is `activation`.
    pub fn open(path: &Path, base: &str, activation: Activation, opts: &StoreOptions) -> Result<Self> {
        let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
        let (index, n, size) = read_index(path)?;
        if index.base != base {
            return Err(bad(format!("made for another model ({}; this one is {base})", index.base)));
        }
        let mut at = HashMap::new();
        for (i, p) in index.parts.iter().enumerate() {
            let len = p
                .len()
                .ok_or_else(|| bad(format!("layer {} expert {}: a weight that does not pack", p.layer, p.expert)))?;
            let end = p.offset.checked_add(padded(len) as u64);
            if p.layer >= index.layers
                || p.expert >= index.experts
                || !(p.offset as usize).is_multiple_of(ALIGN)
                || p.offset < 16 + n
                || end.is_none_or(|e| e > size)
                || at.insert((p.layer, p.expert), i).is_some()
            {
                return Err(bad(format!("layer {} expert {}: a corrupt entry", p.layer, p.expert)));
            }
        }
        let f32s = index.parts.iter().flat_map(|p| &p.weights).filter(|w| w.kind == F32).count();
        if f32s != 0 && f32s != 3 * index.parts.len() {
            return Err(bad("f32 and packed experts mixed: corrupt".into()));
        }
        let packed = f32s == 0;
        let expert_bytes = (0..index.experts)
            .map(|e| index.parts.iter().filter(|p| p.expert == e).filter_map(PartEntry::len).sum::<usize>())
            .max()
            .unwrap_or(0);
        let capacity = match opts.budget {
            Budget::Experts(k) => k,
            Budget::Bytes(b) => {
                let k = if expert_bytes == 0 { index.experts } else { (b / expert_bytes as u64) as usize };
                if k == 0 {
                    return Err(Error::Config(format!(
                        "--expert-budget {:.1} MiB is smaller than one expert ({:.1} MiB)",
                        b as f64 / (1 << 20) as f64,
                        expert_bytes as f64 / (1 << 20) as f64
                    )));
                }
                k
            }
        }
        .min(index.experts.max(1));
        let layers = (0..index.layers)
            .map(|l| {
                let name = if opts.policy == NO_CACHE { "lru" } else { opts.policy.as_str() };
                let policy = crate::cache::policy(name, opts.seed ^ l as u64)
                    .map_err(|e| Error::Config(format!("{e}, or {NO_CACHE}")))?;
                let cache = ExpertCache::new(capacity, policy)?;
                Ok((Mutex::new(Layer { cache, resident: HashMap::new(), staged: None }), Condvar::new()))
            })
            .collect::<Result<Vec<_>>>()?;
        let (file, direct) = open_direct(path).map_err(|e| bad(e.to_string()))?;
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            file,
            direct,
            index,
            at,
            packed,
            activation,
            capacity,
            policy: opts.policy.clone(),
            layers,
            step: AtomicU64::new(0),
            lookahead: Mutex::new(vec![]),
            scratch: Mutex::new(vec![]),
            counters: Counters::default(),
        });
        let prefetch = match opts.prefetch {
            false => None,
            true => {
                let (tx, rx) = mpsc::channel::<(u64, Vec<u32>)>();
                let w = inner.clone();
                let handle = std::thread::Builder::new()
                    .name("expert-prefetch".into())
                    .spawn(move || {
                        for (step, experts) in rx {
                            for l in 0..w.layers.len() {
                                let got = w.fetch(l, &experts).map_err(|e| e.to_string());
                                let (m, cv) = &w.layers[l];
                                lock(m).staged = Some((step, got));
                                cv.notify_all();
                            }
                        }
                    })
                    .map_err(|e| Error::Config(format!("expert prefetch thread: {e}")))?;
                Some((tx, handle))
            }
        };
        Ok(Self { inner, prefetch })
    }

    pub fn layers(&self) -> usize {
        self.inner.index.layers
    }

    pub fn experts(&self) -> usize {
        self.inner.index.experts
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Whether the experts are packed for the quantised kernels (else f32).
    pub fn packed(&self) -> bool {
        self.inner.packed
    }

    /// Whether `layer` has a part for `expert`, and its (gate, up, down) shapes.
    pub fn shapes(&self, layer: usize, expert: usize) -> Option<[(usize, usize); 3]> {
        let p = &self.inner.index.parts[*self.inner.at.get(&(layer, expert))?];
        Some([0, 1, 2].map(|i| (p.weights[i].rows, p.weights[i].cols)))
    }

    /// Tells Belady the experts of the steps after the current one (nearest first).
    pub fn set_lookahead(&self, steps: Vec<Vec<u32>>) {
        *lock(&self.inner.lookahead) = steps;
    }

    /// Starts a step needing `experts` (the first MoE layer calls this: the pre-gate's routes
    /// hold for every layer); with prefetch, the worker starts loading every layer's parts.
    pub fn begin_step(&self, experts: &[u32]) {
        let step = self.inner.step.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((tx, _)) = &self.prefetch {
            // A worker that died answers through `staged` never arriving: parts() falls back.
            let _ = tx.send((step, experts.to_vec()));
        }
    }

    /// The parts of `experts` in `layer` for the current step, loading what is not resident.
    pub fn parts(&self, layer: usize, experts: &[u32]) -> Result<Vec<(u32, Option<Arc<DenseFfn>>)>> {
        let inner = &self.inner;
        let (m, cv) =
            inner.layers.get(layer).ok_or_else(|| Error::Config(format!("layer {layer}: not in the store")))?;
        let t = Instant::now();
        let mut got = match &self.prefetch {
            None => inner.fetch(layer, experts)?,
            Some((_, worker)) => {
                let step = inner.step.load(Ordering::SeqCst);
                let mut g = lock(m);
                while g.staged.as_ref().is_none_or(|(s, _)| *s < step) && !worker.is_finished() {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                match g.staged.take() {
                    Some((s, r)) if s == step => {
                        r.map_err(|e| Error::Data(format!("{}: {e}", inner.path.display())))?
                    }
                    _ => vec![],
                }
            }
        };
        // Whatever the prefetcher was not told about (or could not load) is loaded now.
        let missing: Vec<u32> = experts.iter().copied().filter(|e| !got.iter().any(|(g, _)| g == e)).collect();
        if !missing.is_empty() {
            got.extend(inner.fetch(layer, &missing)?);
        }
        inner.counters.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(got)
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        StoreStats {
            policy: self.inner.policy.clone(),
            capacity: self.inner.capacity,
            experts: self.inner.index.experts,
            prefetch: self.prefetch.is_some(),
            direct: self.inner.direct,
            hits: c.hits.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            bytes_read: c.bytes.load(Ordering::Relaxed),
            load_seconds: secs(&c.load_nanos),
            wait_seconds: secs(&c.wait_nanos),
            resident_bytes: c.resident.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.prefetch.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Inner {
    /// Uses `experts` in `layer`: resident ones are hits, the rest are read (evicting by the
    /// policy).
    fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Parts> {
        let (m, _) = &self.layers[layer];
        let mut g = lock(m);
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            let Some(&i) = self.at.get(&(layer, e as usize)) else {
                out.push((e, None));
                continue;
            };
            if self.policy == NO_CACHE {
                self.counters.loads.fetch_add(1, Ordering::Relaxed);
                out.push((e, Some(self.read(i)?)));
                continue;
            }
            let next = || self.next_uses(experts);
            match g.cache.use_expert(e, next) {
                Use::Hit => {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    let part = g.resident.get(&e).cloned();
                    let part = match part {
                        Some(p) => p,
                        // Counted resident, but its read failed last time: read it again.
                        None => self.read(i)?,
                    };
                    g.resident.insert(e, part.clone());
                    out.push((e, Some(part)));
                }
                Use::Load { evicted } => {
                    if let Some(v) = evicted.and_then(|v| g.resident.remove(&v)) {
                        self.counters.resident.fetch_sub(part_bytes(&v), Ordering::Relaxed);
                    }
                    self.counters.loads.fetch_add(1, Ordering::Relaxed);
                    let part = self.read(i)?;
                    self.counters.resident.fetch_add(part_bytes(&part), Ordering::Relaxed);
                    g.resident.insert(e, part.clone());
                    out.push((e, Some(part)));
                }
            }
        }
        Ok(out)
    }

    /// When each expert is next known to be used: now for the current step's, then by the
    /// look-ahead steps.
    fn next_uses(&self, current: &[u32]) -> Vec<Option<u64>> {
        let ahead = lock(&self.lookahead);
        (0..self.index.experts as u32)
            .map(|e| {
                if current.contains(&e) {
                    return Some(0);
                }
                ahead.iter().position(|s| s.contains(&e)).map(|p| p as u64 + 1)
            })
            .collect()
    }

    /// Reads part `i` from disk and unpacks it.
    fn read(&self, i: usize) -> Result<Arc<DenseFfn>> {
        let t = Instant::now();
        let p = &self.index.parts[i];
        let bad = |what: String| {
            Error::Data(format!("{} layer {} expert {}: {what}", self.path.display(), p.layer, p.expert))
        };
        let len = p.len().ok_or_else(|| bad("a weight that does not pack".into()))?;
        let mut pages = lock(&self.scratch);
        if pages.len() < padded(len) / ALIGN {
            pages.resize(padded(len) / ALIGN, Page([0; ALIGN]));
        }
        let buf = &mut page_bytes(&mut pages)[..padded(len)];
        self.file.read_exact_at(buf, p.offset).map_err(|e| bad(format!("read: {e}")))?;
        if !self.direct {
            drop_pages(&self.file, p.offset, buf.len());
        }
        let mut at = 0;
        let mut take = |w: &WeightEntry, proj: &str| -> Result<Linear> {
            let name = part_name(p.layer, Some(p.expert), proj);
            let (q, s) = w.sizes().ok_or_else(|| bad(format!("{proj}: a weight that does not pack")))?;
            let (qs, sc) = (&buf[at..at + q], &buf[at + q..at + q + s]);
            at += q + s;
            if w.kind == F32 {
                let v: Vec<f32> = qs.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                let t = candle_core::Tensor::from_vec(v, (w.rows, w.cols), &candle_core::Device::Cpu)?;
                return Ok(Linear::dense(name, t));
            }
            let kind = kind_of(&w.kind).ok_or_else(|| bad(format!("{proj}: kind {}", w.kind)))?;
            let packed = PackedWeight::from_raw(kind, w.rows, w.cols, qs, sc)
                .ok_or_else(|| bad(format!("{proj}: the arrays do not fit the shape")))?;
            Ok(Linear::packed(name, Arc::new(packed)))
        };
        let part = DenseFfn {
            gate: take(&p.weights[0], PROJ[0])?,
            up: take(&p.weights[1], PROJ[1])?,
            down: take(&p.weights[2], PROJ[2])?,
            activation: self.activation,
        };
        self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.counters.load_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(Arc::new(part))
    }
}

fn part_bytes(p: &DenseFfn) -> u64 {
    [&p.gate, &p.up, &p.down]
        .iter()
        .map(|l| match &l.weight {
            Weight::Packed(w) => w.bytes() as u64,
            Weight::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        })
        .sum()
}

/// The file opened for direct reads where the file system allows it (tmpfs does not).
fn open_direct(path: &Path) -> std::io::Result<(File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            // Some file systems accept the flag and refuse the first read.
            let mut probe = [Page([0; ALIGN])];
            if f.read_at(page_bytes(&mut probe), 0).is_ok() {
                return Ok((f, true));
            }
        }
    }
    Ok((File::open(path)?, false))
}

/// Drops a read range from the page cache, so the next read of it is a real one.
fn drop_pages(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on a valid descriptor; no memory is touched.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
