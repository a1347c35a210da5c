//! recompose-core: model formats (GGUF, safetensors), configs, tokenizers and chat templates:
//! the bytes of a model on disk (fetching them is recompose-assets'); nothing here runs a model.

pub mod atomic;
pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod identity;
pub mod names;
pub mod peft;
pub mod safetensors_out;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use tokenizer::Tokenizer;
pub use weights::ModelFile;
