//! Diagonal Gaussian factors, parameterised by mean and log standard
//! deviation (digest §5.1).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::Result;

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

/// Summary of a diagonal Gaussian family on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaussianSummary {
    /// Means, row-major.
    pub mean: Vec<f64>,
    /// Standard deviations, row-major.
    pub sd: Vec<f64>,
    /// Shape of the arrays (`[D]` or `[N, L]`).
    pub shape: Vec<usize>,
}

/// A tensor's values as f64 on the host, flattened in row-major order
/// (one device read; for reports and checks, never inside a training loop).
pub fn host_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.detach()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .contiguous()
            .view([-1]),
    )?)
}

pub(crate) fn summarize(p: &GaussianParams) -> Result<GaussianSummary> {
    Ok(GaussianSummary {
        mean: host_vec(&p.mean)?,
        sd: host_vec(&p.log_sd.exp())?,
        shape: p.mean.size().iter().map(|&s| s as usize).collect(),
    })
}
