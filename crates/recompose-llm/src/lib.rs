//! recompose-llm: the transformer runtime. Llama-family and Gemma 3 decoders built around two
//! seams — `KvCache` (what attention remembers) and `Ffn` (what a block's MLP is) — with a fast
//! quantised path, an exact f32 path and a differentiable mode (autograd, LoRA, checkpointing),
//! sampling and batched generation.

pub mod attention;
pub mod batching;
pub mod error;
pub mod ffn;
pub mod generate;
pub mod grad;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod lora;
pub mod model;
pub mod prefix;
pub mod pregate;
pub mod rope;
pub mod sample;
pub mod train;

pub use error::{Error, Result};
pub use kv::{FullCache, KvCache, KvView, Step, StepCache};
pub use model::{LoadOptions, Logits, Model, Output, Plan, Trainable, WeightMode};
pub use train::{Batch, Gradients};
