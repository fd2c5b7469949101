//! One error type for the model core. Every variant says what was being done and to which
//! file or tensor, so a user with a broken checkpoint knows what to fix.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid model config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("unsupported architecture {name:?} (supported: {supported})")]
    UnsupportedArchitecture { name: String, supported: String },

    #[error("{path}: cannot read weights: {message}")]
    CorruptWeights { path: PathBuf, message: String },

    #[error("missing tensor {name:?} (looked in {files})")]
    MissingTensor { name: String, files: String },

    #[error("{file}: tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        file: String,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("model {spec:?}: {message}")]
    ModelNotFound { spec: String, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// A forward batch that does not fit the model or the cache (a caller bug, or a
    /// request that should have been rejected earlier).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),

    #[error("KV cache: {0}")]
    KvCache(String),

    /// The model (and what the caller reserves beside it) does not fit in the memory
    /// this process may use: refused before loading, with the numbers.
    #[error("{0}")]
    OutOfMemory(String),

    /// A kernel the backend of a tensor's device does not have.
    #[error("backend: {0}")]
    Backend(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
