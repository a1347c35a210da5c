//! recompose-kv: KV-cache policies behind recompose-llm's `KvCache` trait.
//!
//! - `full`: every token kept (recompose-llm's `FullCache`);
//! - `window`: attention sinks + a recent window (StreamingLLM), keys at their original positions
//!   or re-positioned by their index in the cache;
//! - `h2o`: heavy hitters (largest accumulated attention) + a recent window (H2O), one token set
//!   per KV head, query heads of a GQA group aggregated.
//!
//! Bounded policies preallocate their slots and overwrite evicted entries in place. `oracle`
//! holds a deliberately simple second implementation (full cache + mask) the tests compare
//! against. Policies are described by a `KvSpec` string such as `h2o:0.2` or `window:256,sinks=4`.

mod bounded;
pub mod oracle;
mod spec;

pub use bounded::BoundedCache;
pub use spec::{Aggregate, Budget, KvSpec, Positions, Prefill, RowBudget, SpecError};
