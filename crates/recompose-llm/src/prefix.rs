//! Prefix caching: the keys and values of prompts already prefilled, kept under a byte budget
//! and reused by later prompts that start with the same tokens (system prompts, multi-turn
//! chats, few-shot headers). A new sequence takes the longest cached prefix of its prompt (all
//! but its last token, whose logits it needs) and prefills only the rest.
//!
//! Only policies that keep every token in order can share (`KvCache::export_prefix`, the full
//! cache): a bounded policy (H2O, windows) has evicted part of a prefix, or will evict by scores
//! that depend on the whole prefill, so its requests neither take from nor add to this cache;
//! they prefill in full. Entries are immutable copies: a request copies a prefix into its own
//! cache, so requests that race on one prefix cannot disturb each other.

use crate::error::{Error, Result};
use candle_core::Tensor;

struct Entry {
    tokens: Vec<u32>,
    /// Per layer `(1, Hkv, len, D)` keys and values.
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    last_used: u64,
}

/// Cached prompt prefixes, least recently used evicted first once `budget` bytes are held.
pub struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
}

fn bytes_of(kv: &[(Tensor, Tensor)]) -> usize {
    kv.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Result<Self> {
        if budget_bytes == 0 {
            return Err(Error::InvalidInput("a prefix cache needs a budget above 0 bytes".into()));
        }
        Ok(Self { budget: budget_bytes, entries: vec![], bytes: 0, clock: 0 })
    }

    /// Bytes held now (never above the budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Prefixes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest cached prefix of `prompt` that leaves at least one token to prefill:
    /// its keys and values, narrowed to the shared length `n` (views; the caller copies).
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<(usize, Vec<(Tensor, Tensor)>)>> {
        let most = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.tokens.iter().zip(prompt).take(most).take_while(|(a, b)| a == b).count()))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)));
        let Some((i, n)) = best.filter(|&(_, n)| n > 0) else { return Ok(None) };
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        let kv = e.kv.iter().map(|(k, v)| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))).collect::<Result<_>>()?;
        Ok(Some((n, kv)))
    }

    /// Keeps the prefix `tokens` with its keys and values. An entry this one extends is
    /// replaced; one that already covers it is only refreshed; one larger than the whole
    /// budget is not kept.
    pub fn insert(&mut self, tokens: &[u32], kv: Vec<(Tensor, Tensor)>) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            e.last_used = self.clock;
            return;
        }
        let bytes = bytes_of(&kv);
        if bytes > self.budget {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        if self.entries.len() != before {
            self.bytes = self.entries.iter().map(|e| e.bytes).sum();
        }
        while self.bytes + bytes > self.budget {
            let Some(lru) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
                break;
            };
            self.bytes -= self.entries.swap_remove(lru).bytes;
        }
        self.entries.push(Entry { tokens: tokens.to_vec(), kv, bytes, last_used: self.clock });
        self.bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One layer whose keys at slot i hold the value i (so a prefix is recognisable).
    fn kv(n: usize) -> Vec<(Tensor, Tensor)> {
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().reshape((1, 1, n, 1)).unwrap();
        vec![(t.clone(), t)]
    }

    #[test]
    fn takes_the_longest_shared_prefix_and_leaves_the_last_token() {
        let mut c = PrefixCache::new(1 << 20).unwrap();
        c.insert(&[1, 2, 3, 4, 5], kv(5));
        c.insert(&[1, 2, 9], kv(3));
        let (n, got) = c.lookup(&[1, 2, 3, 4, 7, 7]).unwrap().unwrap();
        assert_eq!(n, 4);
        assert_eq!(got[0].0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 1., 2., 3.]);
        // The whole prompt is cached: the last token is still prefilled.
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5]).unwrap().unwrap().0, 4);
        assert!(c.lookup(&[8, 1, 2]).unwrap().is_none());
    }

    #[test]
    fn bytes_stay_under_the_budget_under_distinct_prefixes() {
        // Each 10-token entry holds 80 bytes; a budget of 250 keeps three.
        let mut c = PrefixCache::new(250).unwrap();
        for i in 0..50u32 {
            let toks: Vec<u32> = (0..10).map(|j| i * 100 + j).collect();
            c.insert(&toks, kv(10));
            assert!(c.bytes() <= 250, "{} bytes after {} inserts", c.bytes(), i + 1);
        }
        assert_eq!(c.len(), 3);
        // The least recently used go first: the three newest remain.
        assert!(c.lookup(&[4900, 4901, 0]).unwrap().is_some());
        assert!(c.lookup(&[4600, 4601, 0]).unwrap().is_none());
    }

    #[test]
    fn an_extension_replaces_its_prefix_and_a_covered_prefix_adds_nothing() {
        let mut c = PrefixCache::new(1 << 20).unwrap();
        c.insert(&[1, 2, 3], kv(3));
        c.insert(&[1, 2, 3, 4], kv(4));
        assert_eq!((c.len(), c.bytes()), (1, 32));
        c.insert(&[1, 2], kv(2));
        assert_eq!((c.len(), c.bytes()), (1, 32));
        // Too large for the budget: not kept, and nothing evicted for it.
        let mut small = PrefixCache::new(40).unwrap();
        small.insert(&[5, 6], kv(2));
        small.insert(&(0..10).collect::<Vec<_>>(), kv(10));
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn a_zero_budget_is_refused() {
        assert!(PrefixCache::new(0).is_err());
    }
}
