//! Errors of training: bad settings and data, divergence, checkpoints that do not belong to the run.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Llm(#[from] recompose_llm::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    /// The loss or a parameter became NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    #[error("{0}")]
    Checkpoint(String),
}

pub type Result<T> = std::result::Result<T, Error>;
