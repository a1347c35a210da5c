//! Errors of the evaluations.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Llm(#[from] recompose_llm::Error),
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {what}")]
    Data { path: String, what: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;
