//! Errors of the model layer.

use std::path::PathBuf;

/// Everything that can go wrong building, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said (shown in the message, not a separate cause, so it is said once).
        error: std::io::Error,
    },
    /// A file that is not a usable safetensors checkpoint.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor whose shape does not fit the architecture.
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Shape the architecture needs.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A required tensor is missing.
    #[error("{path}: tensor '{name}' is missing")]
    Missing {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
    },
    /// Tensors the loader does not know (never silently ignored).
    #[error("{path}: unknown tensors: {}", names.join(", "))]
    Unknown {
        /// The file.
        path: PathBuf,
        /// Their names.
        names: Vec<String>,
    },
    /// A checkpoint whose architecture needs something this crate does not implement.
    #[error("{}: {feature} is not implemented (revealed by {revealed_by}); not loading it half-right", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The missing feature.
        feature: String,
        /// What showed it: a tensor, or config.json's architecture.
        revealed_by: String,
    },
    /// An adapter trained on a different backbone.
    #[error("{0}")]
    Incompatible(String),
    /// Inconsistent configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
