//! recompose-llm: the transformer runtime. Llama-family and Gemma 3 decoders built around two
//! seams — `KvCache` (what attention remembers) and `Ffn` (what a block's MLP is) — with a fast
//! quantised path and an exact f32 path, sampling and batched generation.

pub mod attention;
pub mod error;
pub mod ffn;
pub mod generate;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod model;
pub mod rope;
pub mod sample;

pub use error::{Error, Result};
pub use kv::{FullCache, KvCache, KvView, Step};
pub use model::{Logits, Model, WeightMode};
