//! Errors of MoE refactorisation: bad settings, statistics too thin to rank channels, splits
//! that do not fit the model.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Assets(#[from] recompose_assets::Error),
    #[error(transparent)]
    Llm(#[from] recompose_llm::Error),
    #[error(transparent)]
    Train(#[from] recompose_train::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
}

pub type Result<T> = std::result::Result<T, Error>;
