//! recompose-fuzz: a small mutation fuzzer on stable Rust for the readers of untrusted input
//! (GGUF, safetensors headers and shard indexes, merge YAML, KV specs, chat templates, API
//! request bodies).
//!
//! No compiler instrumentation: inputs are kept when they produce an outcome (error message,
//! output size class) not seen before, which is coarse but needs nothing beyond stable Rust.
//! Owns the fuzz loop, the mutators, the targets and their seeds; never changes what it tests.

pub mod alloc;
pub mod mutate;
pub mod runner;
pub mod seeds;
pub mod targets;

pub use runner::{fuzz, replay, Finding, Kind, Options, Report};
pub use targets::{find, Target, TARGETS};
