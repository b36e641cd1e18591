//! Diagonal Gaussian factors, parameterised by mean and log standard
//! deviation (digest §5.1).

use tch::Tensor;

/// Parameters of a batch of diagonal Gaussians: `mean` and `log_sd` have the
/// same shape (e.g. `[D]` for q(θ) or `[N, L]` for the local factors), and
/// the standard deviation is `exp(log_sd)`.
#[derive(Debug)]
pub struct GaussianParams {
    /// Means.
    pub mean: Tensor,
    /// Log standard deviations.
    pub log_sd: Tensor,
}

impl GaussianParams {
    /// Reparameterised draws `mean + exp(log_sd) ⊙ eps`; `eps` has the
    /// parameters' shape with leading draw dimensions.
    pub fn sample(&self, eps: &Tensor) -> Tensor {
        self.mean.addcmul(&self.log_sd.exp(), eps)
    }

    /// `Σ log sd` over every element (the data-dependent part of the entropy).
    pub fn sum_log_sd(&self) -> Tensor {
        self.log_sd.sum(self.log_sd.kind())
    }

    /// Number of scalar latent dimensions covered.
    pub fn numel(&self) -> usize {
        self.mean.numel()
    }

    /// A copy detached from the autograd graph.
    pub fn detach(&self) -> Self {
        Self {
            mean: self.mean.detach(),
            log_sd: self.log_sd.detach(),
        }
    }
}
