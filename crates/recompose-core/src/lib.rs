//! recompose-core: model formats (GGUF, safetensors), configs, tokenizers, chat templates. Everything that touches bytes on disk lives here; nothing here runs a model.

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
