//! The one error type of recompose-core. Every variant says what is wrong and where (file,
//! tensor, key), so the binary can print it on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message and deliberately not a `source`: an error chain
    /// printed with its causes would say it twice ("...: No such file: No such file").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a GGUF file (magic {magic:#010x}, expected 0x46554747 'GGUF')")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    UnsupportedGgufVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt GGUF header: {what}")]
    CorruptGguf { path: PathBuf, what: String },
    #[error("{path}: tensor '{tensor}': {what}")]
    BadTensor { path: PathBuf, tensor: String, what: String },
    #[error("{path}: invalid safetensors: {what}")]
    BadSafetensors { path: PathBuf, what: String },
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}': {what}")]
    BadKey { path: PathBuf, key: String, what: String },
    #[error("unknown architecture '{0}' (supported: llama, gemma3)")]
    UnknownArchitecture(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
}
