//! The expert store: a MoE whose experts are read from the store under any budget, policy and
//! prefetch setting gives the resident MoE's logits bit for bit; its hit and load counts are an
//! expert cache's over the same steps; bad stores and budgets are refused with one line.

use candle_core::DType;
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model, Plan, WeightMode};
use recompose_moe::cache::{policy, ExpertCache, POLICIES};
use recompose_moe::store::{self, Budget, ExpertStore, StoreOptions};
use recompose_moe::MoeModel;
use std::sync::Arc;

mod common;
use common::tiny;

const ROW: [u32; 14] = [5, 17, 3, 99, 41, 7, 250, 12, 64, 8, 130, 77, 21, 9];
/// Tokens prefilled in the first step; the rest are decoded one per step.
const PREFILL: usize = 5;

/// Every step's logits: `PREFILL` tokens at once, then one token per step.
fn run(model: &Model) -> Vec<f32> {
    let mut cache = model.new_cache(1);
    let mut out = vec![];
    let steps = std::iter::once(&ROW[..PREFILL]).chain(ROW[PREFILL..].chunks(1));
    for chunk in steps {
        let (tokens, step) = step_for(&[chunk.to_vec()], &cache, 0);
        let o = model.forward_with(&tokens, &step, &mut [&mut cache], Logits::All, &Plan::default()).unwrap();
        out.extend(o.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// The experts each step of [`run`] needs, by the router's picks over the whole row.
fn needs(model: &Model) -> Vec<Vec<u32>> {
    let routes = model.routes(&ROW).unwrap();
    let mut first: Vec<u32> = routes[..PREFILL].to_vec();
    first.sort_unstable();
    first.dedup();
    std::iter::once(first).chain(routes[PREFILL..].iter().map(|&e| vec![e])).collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    file: recompose_core::weights::ModelFile,
    path: std::path::PathBuf,
    base: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (file, model) = tiny(dir.path(), "llama", 4, DType::F32, WeightMode::Quantized);
    let moe = common::moe(&file, &model, None);
    let path = dir.path().join(store::FILE_NAME);
    let bytes = store::write(&path, &moe.config.base, &moe.ffns(&model).unwrap()).unwrap();
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    let base = moe.config.base.clone();
    Fixture { _dir: dir, file, path, base }
}

fn load(fx: &Fixture) -> (Model, MoeModel) {
    let (_, model) = tiny(fx.path.parent().unwrap(), "llama", 4, DType::F32, WeightMode::Quantized);
    let moe = common::moe(&fx.file, &model, None);
    (model, moe)
}

fn opts(budget: Budget, policy: &str, prefetch: bool) -> StoreOptions {
    StoreOptions { budget, policy: policy.into(), seed: 3, prefetch }
}

fn stored(fx: &Fixture, o: &StoreOptions) -> (Model, Arc<ExpertStore>) {
    let (mut model, moe) = load(fx);
    let act = model.config.activation;
    let s = Arc::new(ExpertStore::open(&fx.path, &fx.base, act, o).unwrap());
    moe.apply_stored(&mut model, s.clone()).unwrap();
    (model, s)
}

#[test]
fn a_stored_moe_gives_the_resident_moes_logits_under_every_budget_policy_and_prefetch() {
    let fx = fixture();
    let (mut resident, moe) = load(&fx);
    moe.apply(&mut resident).unwrap();
    let want = run(&resident);
    let steps = needs(&resident);
    // The row must exercise the cache: more than one expert, and a change of expert between steps.
    assert!(steps[0].len() > 1 && steps.windows(2).any(|w| w[0] != w[1]), "{steps:?}");
    for cap in 1..=3 {
        for p in POLICIES.iter().copied().chain([store::NO_CACHE]) {
            for prefetch in [false, true] {
                let (model, s) = stored(&fx, &opts(Budget::Experts(cap), p, prefetch));
                assert_eq!(run(&model), want, "capacity {cap}, {p}, prefetch {prefetch}");
                let st = s.stats();
                assert_eq!((st.capacity, st.prefetch), (cap, prefetch));
                // Each layer's uses are the steps' needs among the experts it has channels for.
                let mut hits = 0;
                let mut loads = 0;
                if p != "random" {
                    for l in 0..s.layers() {
                        // No cache: a cache of one that forgets between steps loads every use.
                        let none = p == store::NO_CACHE;
                        let mut c = ExpertCache::new(cap, policy(if none { "lru" } else { p }, 0).unwrap()).unwrap();
                        for need in &steps {
                            for &e in need.iter().filter(|&&e| s.shapes(l, e as usize).is_some()) {
                                // Belady knows this step's experts (used now) and nothing beyond.
                                c.use_expert(e, || (0..3u32).map(|x| need.contains(&x).then_some(0)).collect());
                            }
                        }
                        if none {
                            loads += c.hits + c.loads;
                        } else {
                            hits += c.hits;
                            loads += c.loads;
                        }
                    }
                    assert_eq!((st.hits, st.loads), (hits, loads), "capacity {cap}, {p}, prefetch {prefetch}");
                }
                assert!(st.loads > 0 && st.bytes_read > 0 && st.load_seconds > 0.0);
                // Resident bytes stay within the budget: at most `cap` parts per layer.
                let biggest = (0..s.layers())
                    .map(|l| {
                        (0..3)
                            .filter_map(|e| s.shapes(l, e))
                            .map(|sh| sh.iter().map(|(r, c)| r * c).sum::<usize>())
                            .max()
                            .unwrap_or(0)
                    })
                    .sum::<usize>();
                assert!(
                    st.resident_bytes as usize <= cap * biggest * 2,
                    "{} > {cap} x {biggest} x 2",
                    st.resident_bytes
                );
            }
        }
    }
    // With every expert resident only first uses load.
    let (model, s) = stored(&fx, &opts(Budget::Experts(3), "lru", false));
    run(&model);
    let first_uses: u64 = (0..s.layers())
        .map(|l| {
            (0..3).filter(|&e| s.shapes(l, e).is_some() && steps.iter().any(|n| n.contains(&(e as u32)))).count() as u64
        })
        .sum();
    assert_eq!(s.stats().loads, first_uses);
}

#[test]
fn a_budget_below_one_expert_a_foreign_or_corrupt_store_or_one_of_another_mode_are_refused() {
    let fx = fixture();
    let act = recompose_core::config::Activation::Silu;
    let o = opts(Budget::Bytes(1000), "lru", false);
    let e = ExpertStore::open(&fx.path, &fx.base, act, &o).err().unwrap().to_string();
    assert!(e.contains("smaller than one expert"), "{e}");
    let ok = opts(Budget::Experts(2), "lru", false);
    let e = ExpertStore::open(&fx.path, "llama-0-0", act, &ok).err().unwrap().to_string();
    assert!(e.contains("made for another model"), "{e}");
    let e =
        ExpertStore::open(&fx.path, &fx.base, act, &opts(Budget::Experts(2), "fifo", false)).err().unwrap().to_string();
    assert!(e.contains("fifo") && e.contains("none"), "{e}");
    let bytes = std::fs::read(&fx.path).unwrap();
    let bad = fx.path.with_extension("bad");
    for (what, b, want) in [
        ("magic", [b"XXXXXXXX".as_slice(), &bytes[8..]].concat(), "not an expert store"),
        ("short", bytes[..10].to_vec(), "too short"),
        ("huge index", [&bytes[..8], &u64::MAX.to_le_bytes()[..], &bytes[16..]].concat(), "corrupt"),
        ("truncated parts", bytes[..bytes.len() - 4096].to_vec(), "a corrupt entry"),
    ] {
        std::fs::write(&bad, &b).unwrap();
        let e = ExpertStore::open(&bad, &fx.base, act, &ok).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(want), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: {e}");
    }
    let json_at = 16;
    let mut flipped = bytes.clone();
    flipped[json_at + 2] = b'#';
    std::fs::write(&bad, &flipped).unwrap();
    let e = ExpertStore::open(&bad, &fx.base, act, &ok).err().unwrap().to_string();
    assert!(e.contains("a corrupt index"), "{e}");
    // A store of another split of the same model (its last expert dropped) is refused when
    // applied.
    let dir = fx.path.parent().unwrap();
    let (model, mut other) = load(&fx);
    for layer in &mut other.config.split.experts {
        layer.pop();
    }
    other.config.split.names.pop();
    let other_path = dir.join("other.store");
    store::write(&other_path, &fx.base, &other.ffns(&model).unwrap()).unwrap();
    let s = Arc::new(ExpertStore::open(&other_path, &fx.base, act, &ok).unwrap());
    let (mut model, moe) = load(&fx);
    let e = moe.apply_stored(&mut model, s).err().unwrap().to_string();
    assert!(e.contains("made from another MoE"), "{e}");
    // A packed store is refused by the same MoE run in f32 (its shapes are padded), and f64
    // experts are not written at all (nothing half-written is left).
    let (f, mut model) = tiny(dir, "llama", 4, DType::F32, WeightMode::F32);
    let s = Arc::new(ExpertStore::open(&fx.path, &fx.base, act, &ok).unwrap());
    let e = common::moe(&f, &model, None).apply_stored(&mut model, s).err().unwrap().to_string();
    assert!(e.contains("holds packed experts and this model runs f32"), "{e}");
    let (f, model) = tiny(dir, "llama", 4, DType::F64, WeightMode::F32);
    let moe = common::moe(&f, &model, None);
    let e = store::write(&dir.join("f64.store"), &fx.base, &moe.ffns(&model).unwrap()).err().unwrap().to_string();
    assert!(e.contains("F64 weight"), "{e}");
    assert!(!dir.join("f64.store").exists());
}

#[test]
fn an_f32_moe_runs_from_its_store_as_it_runs_resident() {
    let dir = tempfile::tempdir().unwrap();
    let (file, mut resident) = tiny(dir.path(), "llama", 2, DType::F32, WeightMode::F32);
    let moe = common::moe(&file, &resident, None);
    let path = dir.path().join(store::FILE_NAME);
    store::write(&path, &moe.config.base, &moe.ffns(&resident).unwrap()).unwrap();
    let base = moe.config.base.clone();
    moe.apply(&mut resident).unwrap();
    let (_, mut model) = tiny(dir.path(), "llama", 2, DType::F32, WeightMode::F32);
    let s = Arc::new(
        ExpertStore::open(&path, &base, model.config.activation, &opts(Budget::Experts(1), "belady", true)).unwrap(),
    );
    common::moe(&file, &model, None).apply_stored(&mut model, s.clone()).unwrap();
    assert_eq!(run(&model), run(&resident));
    assert!(s.stats().loads > 0);
}

#[test]
fn budgets_parse_as_counts_or_sizes() {
    assert_eq!("4".parse::<Budget>(), Ok(Budget::Experts(4)));
    assert_eq!("512MiB".parse::<Budget>(), Ok(Budget::Bytes(512 << 20)));
    assert_eq!("1.5GiB".parse::<Budget>(), Ok(Budget::Bytes(3 << 29)));
    for bad in ["0", "-1", "lots", "0MiB", "MiB", "nanGiB"] {
        assert!(bad.parse::<Budget>().is_err(), "{bad}");
    }
}

#[test]
fn belady_in_the_store_keeps_the_expert_the_look_ahead_names_where_lru_would_not() {
    let fx = fixture();
    let act = recompose_core::config::Activation::Silu;
    for (policy, kept) in [("belady", true), ("lru", false)] {
        let s = ExpertStore::open(&fx.path, &fx.base, act, &opts(Budget::Experts(2), policy, false)).unwrap();
        let layer =
            (0..s.layers()).find(|&l| (0..3).all(|e| s.shapes(l, e).is_some())).expect("a layer with 3 experts");
        for e in [0, 1] {
            s.parts(layer, &[e]).unwrap();
        }
        // Full at {0, 1}: loading 2 evicts the least recent (0) unless 0 is known to come next.
        s.set_lookahead(vec![vec![0]]);
        s.parts(layer, &[2]).unwrap();
        let before = s.stats().hits;
        s.parts(layer, &[0]).unwrap();
        assert_eq!(s.stats().hits - before == 1, kept, "{policy}");
    }
}
