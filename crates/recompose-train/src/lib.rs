//! recompose-train: what every training loop of recompose shares — named parameters, AdamW and
//! SGD, learning-rate schedules, gradient clipping, seeded data order, checkpoints that resume bit
//! for bit — and the language-model fine-tuning loop (LoRA or full) built on the decoder's
//! differentiable mode. Determinism: every random choice is derived from the seed and the step,
//! and reductions run in a fixed order, so the same seed and thread count give the same weights.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod finetune;
pub mod optim;
pub mod schedule;

pub use error::{Error, Result};
pub use optim::{Optimizer, OptimizerKind, Param};
pub use schedule::{Decay, Schedule};
