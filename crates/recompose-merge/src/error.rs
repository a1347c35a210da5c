//! Errors of the weight-space tools. Each names the file, model, tensor or key it is about and
//! prints on one line.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad merge config: unknown key, bad value, missing parameter.
    #[error("{0}")]
    Config(String),
    /// Inputs that cannot be combined: architectures, shapes, missing tensors.
    #[error("{0}")]
    Mismatch(String),
    /// An artifact (task vector, signature) that is malformed or made for another model.
    #[error("{0}")]
    Artifact(String),
    #[error(transparent)]
    Core(#[from] recompose_core::Error),
    #[error(transparent)]
    Assets(#[from] recompose_assets::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// The message without the variant's context, for re-wrapping with a file name.
    pub fn bare(&self) -> String {
        self.to_string().replace('\n', " ")
    }
}

pub type Result<T> = std::result::Result<T, Error>;
