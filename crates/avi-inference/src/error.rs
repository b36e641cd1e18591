//! The error type of `avi-inference`.

use avi_models::ModelError;

/// Everything that can go wrong when configuring or running a fit.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A fit option or method setting is invalid.
    #[error("invalid setting `{field}`: {reason}")]
    InvalidConfig {
        /// The config field at fault.
        field: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The model rejected its input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// An error of the CUDA-graph / fused-Adam layer (avi-cuda).
    #[error(transparent)]
    Cuda(#[from] avi_cuda::CudaError),
    /// A saved fit ([`crate::Fitted`]) cannot be written or read: a missing,
    /// truncated or modified file, a tensor of the wrong shape or dtype, a
    /// newer format, a target folder holding something else.
    #[error("saved fit {path}: {problem}")]
    Saved {
        /// The file or folder at fault.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A saved fit is not the one asked for (another model, method or
    /// data set).
    #[error("saved fit {path} is for another {what}: saved {saved}, asked {asked}")]
    SavedMismatch {
        /// The saved folder.
        path: String,
        /// What differs (`model`, `method`, `training data`, ...).
        what: String,
        /// The saved value.
        saved: String,
        /// The value asked for.
        asked: String,
    },
    /// New data cannot be encoded by this family.
    #[error("cannot encode new data: {0}")]
    Encode(String),
    /// An estimate came out non-finite (infinite or NaN).
    #[error("non-finite estimate: {0}")]
    NonFinite(String),
    /// A checkpoint could not be written, or one to resume from is
    /// missing, tampered with, truncated or of another fit.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file or folder at fault.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl InferenceError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

impl InferenceError {
    pub(crate) fn checkpoint(
        path: impl Into<std::path::PathBuf>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// `Result` with [`InferenceError`].
pub type Result<T> = std::result::Result<T, InferenceError>;
