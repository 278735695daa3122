//! Why a run (or an evaluation, or a pretraining) cannot go on.

use super::protocol::Notice;
use crate::data::DataError;
use crate::model::ModelError;
use std::path::PathBuf;

/// Why a run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad data.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Bad backbone or checkpoint.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A bad setting.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said (shown in the message, not a separate cause, so it is said once).
        error: std::io::Error,
    },
    /// The run folder cannot be used as asked (another writer, a flag combination).
    #[error(transparent)]
    RunFolder(#[from] super::runfolder::RunFolderError),
    /// Stopped by an interrupt before there was anything to save.
    #[error("interrupted")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: source,
        }
    }

    /// As a notice with the file (and line) involved.
    #[must_use]
    pub fn notice(&self, step: u64, time_s: f64) -> Notice {
        let (path, line) = match self {
            Self::Data(DataError::File { path, line, .. }) => (Some(path.clone()), *line),
            Self::Io { path, .. }
            | Self::RunFolder(super::runfolder::RunFolderError::Io { path, .. })
            | Self::Model(
                ModelError::Io { path, .. } | ModelError::Format { path, .. } | ModelError::Shape { path, .. },
            ) => (Some(path.clone()), None),
            _ => (None, None),
        };
        Notice {
            step,
            time_s,
            message: self.to_string(),
            path,
            line,
        }
    }
}

/// Result with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
