//! Which experts stay resident when only `capacity` of them fit in memory (Read-ME's expert
//! cache). A use of a resident expert is a hit; a use of any other is a load, which evicts one
//! resident expert when the cache is full. Which one is the [`Eviction`] policy's choice:
//! [`Random`], [`Lru`], [`Lfu`] or [`Belady`], the one whose next known use lies furthest ahead.
//! Belady is possible here because the pre-gate routes every token before the backbone runs:
//! a server knows the experts of every queued prompt and of every sampled token before it needs
//! them.

use crate::{Error, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::cmp::Reverse;

/// The policy names [`policy`] knows, in the order reports list them.
pub const POLICIES: &[&str] = &["random", "lru", "lfu", "belady"];

/// An eviction policy: asked for a victim when a load finds the cache full.
pub trait Eviction: Send {
    fn name(&self) -> &'static str;
    /// Whether [`Eviction::victim`] reads `next_use` (the caller computes it only then).
    fn looks_ahead(&self) -> bool {
        false
    }
    /// The expert of `resident` (never empty) to evict, given every expert's `uses` so far.
    /// `next_use[e]` is when expert `e` is next known to be used, in the caller's clock
    /// (`None`: no use known); empty unless [`Eviction::looks_ahead`].
    fn victim(&mut self, resident: &[u32], uses: &Uses, next_use: &[Option<u64>]) -> u32;
}

/// Recency and frequency of every expert's uses, kept by the cache for its policy.
#[derive(Default)]
pub struct Uses {
    tick: u64,
    last: Vec<u64>,
    count: Vec<u64>,
}

impl Uses {
    fn used(&mut self, e: u32) {
        let e = e as usize;
        if e >= self.last.len() {
            self.last.resize(e + 1, 0);
            self.count.resize(e + 1, 0);
        }
        self.tick += 1;
        self.last[e] = self.tick;
        self.count[e] += 1;
    }

    /// When `e` was last used, on a clock that ticks at every use (0: never).
    pub fn last(&self, e: u32) -> u64 {
        self.last.get(e as usize).copied().unwrap_or(0)
    }

    /// How many times `e` was used.
    pub fn count(&self, e: u32) -> u64 {
        self.count.get(e as usize).copied().unwrap_or(0)
    }
}

/// Evicts a resident expert drawn uniformly (seeded).
pub struct Random(StdRng);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl Eviction for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn victim(&mut self, resident: &[u32], _: &Uses, _: &[Option<u64>]) -> u32 {
        resident.get(self.0.random_range(0..resident.len().max(1))).copied().unwrap_or(0)
    }
}

/// Evicts the least recently used expert.
pub struct Lru;

impl Eviction for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn victim(&mut self, resident: &[u32], uses: &Uses, _: &[Option<u64>]) -> u32 {
        resident.iter().copied().min_by_key(|&e| uses.last(e)).unwrap_or(0)
    }
}

/// Evicts the least frequently used expert (over all uses so far), the least recent of equals.
pub struct Lfu;

impl Eviction for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn victim(&mut self, resident: &[u32], uses: &Uses, _: &[Option<u64>]) -> u32 {
        resident.iter().copied().min_by_key(|&e| (uses.count(e), uses.last(e))).unwrap_or(0)
    }
}

/// Evicts the expert whose next known use lies furthest ahead; experts with no known use come
/// first (beyond the horizon nothing is known), the least recently used of them.
pub struct Belady;

impl Eviction for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn looks_ahead(&self) -> bool {
        true
    }
    fn victim(&mut self, resident: &[u32], uses: &Uses, next_use: &[Option<u64>]) -> u32 {
        let next = |e: u32| next_use.get(e as usize).copied().flatten().unwrap_or(u64::MAX);
        // Furthest next use first, then the least recent.
        resident.iter().copied().max_by_key(|&e| (next(e), Reverse(uses.last(e)))).unwrap_or(0)
    }
}

/// The policy named `name` (one of [`POLICIES`]); `seed` seeds `random`.
pub fn policy(name: &str, seed: u64) -> Result<Box<dyn Eviction>> {
    Ok(match name {
        "random" => Box::new(Random::new(seed)),
        "lru" => Box::new(Lru),
        "lfu" => Box::new(Lfu),
        "belady" => Box::new(Belady),
        other => return Err(Error::Config(format!("expert cache `{other}`: expected one of {}", POLICIES.join(", ")))),
    })
}

/// What a use did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Hit,
    /// The expert was loaded, evicting `evicted` when the cache was full.
    Load {
        evicted: Option<u32>,
    },
}

/// The resident set of experts under a capacity, with its counts.
pub struct ExpertCache {
    capacity: usize,
    resident: Vec<u32>,
    policy: Box<dyn Eviction>,
    uses: Uses,
    pub hits: u64,
    pub loads: u64,
}

impl ExpertCache {
    pub fn new(capacity: usize, policy: Box<dyn Eviction>) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::Config("an expert cache holds at least one expert".into()));
        }
        Ok(Self { capacity, resident: Vec::with_capacity(capacity), policy, uses: Uses::default(), hits: 0, loads: 0 })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn policy(&self) -> &'static str {
        self.policy.name()
    }

    pub fn resident(&self) -> &[u32] {
        &self.resident
    }

    /// Uses `expert`. `next_use` is called only when a full cache's policy looks ahead (see
    /// [`Eviction::victim`]).
    pub fn use_expert(&mut self, expert: u32, next_use: impl FnOnce() -> Vec<Option<u64>>) -> Use {
        self.uses.used(expert);
        if self.resident.contains(&expert) {
            self.hits += 1;
            return Use::Hit;
        }
        self.loads += 1;
        let evicted = if self.resident.len() < self.capacity {
            None
        } else {
            let ahead = if self.policy.looks_ahead() { next_use() } else { Vec::new() };
            let v = self.policy.victim(&self.resident, &self.uses, &ahead);
            self.resident.retain(|&e| e != v);
            Some(v)
        };
        self.resident.push(expert);
        Use::Load { evicted }
    }

    /// Hits over all uses (0 before any use).
    pub fn hit_rate(&self) -> f64 {
        hit_rate(self.hits, self.loads)
    }
}

/// Hits over all uses (0 before any use).
pub fn hit_rate(hits: u64, loads: u64) -> f64 {
    match hits + loads {
        0 => 0.0,
        n => hits as f64 / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads of `seq` through a cache of `cap`, Belady told the true next uses (no horizon).
    fn loads(seq: &[u32], cap: usize, name: &str) -> u64 {
        let mut c = ExpertCache::new(cap, policy(name, 7).unwrap()).unwrap();
        for (i, &e) in seq.iter().enumerate() {
            c.use_expert(e, || {
                let n = seq.iter().copied().max().unwrap_or(0) as usize + 1;
                (0..n as u32).map(|x| seq[i + 1..].iter().position(|&y| y == x).map(|p| (i + 1 + p) as u64)).collect()
            });
        }
        assert_eq!(c.hits + c.loads, seq.len() as u64);
        c.loads
    }

    /// The fewest loads any eviction choices achieve: exhaustive search (small cases only).
    fn optimal(seq: &[u32], cap: usize, resident: Vec<u32>) -> u64 {
        let Some((&e, rest)) = seq.split_first() else { return 0 };
        if resident.contains(&e) {
            return optimal(rest, cap, resident);
        }
        if resident.len() < cap {
            let mut r = resident;
            r.push(e);
            return 1 + optimal(rest, cap, r);
        }
        (0..resident.len())
            .map(|i| {
                let mut r = resident.clone();
                r[i] = e;
                1 + optimal(rest, cap, r)
            })
            .min()
            .unwrap_or(0)
    }

    #[test]
    fn belady_with_the_whole_future_is_optimal() {
        let mut rng = StdRng::seed_from_u64(3);
        for case in 0..60 {
            let n = 6 + case % 7;
            let experts = 3 + case % 4;
            let seq: Vec<u32> = (0..n).map(|_| rng.random_range(0..experts as u32)).collect();
            for cap in 1..experts {
                let best = optimal(&seq, cap, Vec::new());
                assert_eq!(loads(&seq, cap, "belady"), best, "{seq:?} capacity {cap}");
                for p in ["random", "lru", "lfu"] {
                    assert!(loads(&seq, cap, p) >= best, "{p} beat the optimum on {seq:?}");
                }
            }
        }
    }

    #[test]
    fn lru_and_lfu_evict_by_their_rules() {
        // a b a c: LRU evicts b (a was used later), LFU evicts b (a was used twice).
        let mut lru = ExpertCache::new(2, policy("lru", 0).unwrap()).unwrap();
        let mut lfu = ExpertCache::new(2, policy("lfu", 0).unwrap()).unwrap();
        for c in [&mut lru, &mut lfu] {
            for e in [0, 1, 0] {
                c.use_expert(e, Vec::new);
            }
        }
        assert_eq!(lru.use_expert(2, Vec::new), Use::Load { evicted: Some(1) });
        assert_eq!(lfu.use_expert(2, Vec::new), Use::Load { evicted: Some(1) });
        // a a b c: LRU evicts a (least recent), LFU evicts b (a is more frequent).
        let mut lru = ExpertCache::new(2, policy("lru", 0).unwrap()).unwrap();
        let mut lfu = ExpertCache::new(2, policy("lfu", 0).unwrap()).unwrap();
        for c in [&mut lru, &mut lfu] {
            for e in [0, 0, 1] {
                c.use_expert(e, Vec::new);
            }
        }
        assert_eq!(lru.use_expert(2, Vec::new), Use::Load { evicted: Some(0) });
        assert_eq!(lfu.use_expert(2, Vec::new), Use::Load { evicted: Some(1) });
        assert_eq!((lru.hits, lru.loads), (1, 3));
    }

    #[test]
    fn belady_without_known_uses_falls_back_to_lru() {
        let mut c = ExpertCache::new(2, policy("belady", 0).unwrap()).unwrap();
        c.use_expert(0, Vec::new);
        c.use_expert(1, Vec::new);
        c.use_expert(0, Vec::new);
        // Nothing known ahead: the least recent (1) goes.
        assert_eq!(c.use_expert(2, || vec![None; 3]), Use::Load { evicted: Some(1) });
        // Resident {0, 2}: 0 is next used at 5, 2 never, so 2 goes though LRU would take 0.
        assert_eq!(c.use_expert(1, || vec![Some(5), None, None]), Use::Load { evicted: Some(2) });
    }

    #[test]
    fn a_zero_capacity_or_an_unknown_policy_is_refused() {
        assert!(ExpertCache::new(0, policy("lru", 0).unwrap()).is_err());
        let e = policy("fifo", 0).err().unwrap().to_string();
        assert!(e.contains("fifo") && e.contains("belady"), "{e}");
    }
}
