//! Errors of the vision crate; each prints on one line and names what it is about.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set file that is missing, truncated or malformed.
    #[error("{0}")]
    Data(String),
    /// A bad option or config: unknown model, corruption, attack, bad epsilon.
    #[error("{0}")]
    Config(String),
    /// A checkpoint that is malformed or made for another model.
    #[error("{0}")]
    Checkpoint(String),
    /// Training diverged or degenerated (NaN loss, collapsed routing).
    #[error("{0}")]
    Diverged(String),
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Assets(#[from] recompose_assets::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
