//! recompose-merge: weight-space tools. Merging with mergekit's YAML and semantics, streamed one
//! tensor at a time; task vectors; robust weight signatures.

pub mod config;
pub mod delta;
pub mod error;
pub mod merge;
pub mod methods;
pub mod output;
pub mod plan;
pub mod signature;
pub mod sparsify;
pub mod store;
pub mod vocab;

pub use config::MergeConfig;
pub use error::{Error, Result};
pub use store::Store;
