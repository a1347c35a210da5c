//! Errors of the model runtime.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    ContextOverflow { tokens: usize, context: usize },
    #[error("{0}")]
    InvalidInput(String),
    /// A gradient was asked of something that has none (a quantised weight).
    #[error("{0}")]
    NoGradient(String),
}

pub type Result<T> = std::result::Result<T, Error>;
