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
