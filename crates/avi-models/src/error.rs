//! The error type of `avi-models`.

/// Everything that can go wrong when building a model, simulating data or
/// evaluating a reference solution.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model parameter is outside its valid range.
    #[error("model parameter `{name}` = {value} is invalid: {reason}")]
    InvalidParameter {
        /// The parameter's name as it appears in configs.
        name: &'static str,
        /// The offending value.
        value: f64,
        /// What the valid range is.
        reason: &'static str,
    },
    /// The data set is unusable for this model.
    #[error("invalid data: {0}")]
    InvalidData(String),
    /// A tensor had an unexpected shape.
    #[error("shape mismatch in {what}: expected {expected}, got {got:?}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape received.
        got: Vec<i64>,
    },
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
