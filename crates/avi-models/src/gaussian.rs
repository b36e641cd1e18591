//! Exact mean-field solutions for models whose posterior is Gaussian.
//!
//! If `p(v | x) = N(μ, Φ⁻¹)` for v = (θ, z) ∈ ℝ^d, the optimum of mean-field
//! Gaussian VI (F-VI) recovers the exact means μ and has variances `1/Φ_ii`
//! (digest §3.1, §5.2). Its ELBO, all constants included, is
//!
//! ```text
//! ELBO* = log p(μ, x) + (d/2) log 2π − ½ Σ_i log Φ_ii
//! ```
//!
//! because `log p(v, x) = log p(μ, x) − ½ (v − μ)ᵀ Φ (v − μ)` exactly, whose
//! expectation under q is `log p(μ, x) − d/2`, and the entropy of q is
//! `(d/2)(1 + log 2π) − ½ Σ log Φ_ii`.

use crate::HALF_LN_2PI;

/// The exact F-VI optimum of a model with a Gaussian posterior, in f64.
///
/// Local arrays are flattened row-major over `[N, L]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianReference {
    /// Mean of q*(θ), D values.
    pub theta_mean: Vec<f64>,
    /// Standard deviation of q*(θ), D values.
    pub theta_sd: Vec<f64>,
    /// Means of q*(z_n), N·L values.
    pub z_mean: Vec<f64>,
    /// Standard deviations of q*(z_n), N·L values.
    pub z_sd: Vec<f64>,
    /// The optimal ELBO, all normalising constants included.
    pub elbo: f64,
}

/// `ELBO* = log p(μ, x) + (d/2) log 2π − ½ Σ log Φ_ii` given the log joint
/// at the posterior mean and the diagonal of the posterior precision.
pub fn optimal_elbo(log_joint_at_mean: f64, precision_diag: impl IntoIterator<Item = f64>) -> f64 {
    let mut d = 0usize;
    let mut half_log_det = 0.0;
    for p in precision_diag {
        d += 1;
        half_log_det += 0.5 * p.ln();
    }
    log_joint_at_mean + d as f64 * HALF_LN_2PI - half_log_det
}

/// Entropy of a diagonal Gaussian with the given standard deviations:
/// `Σ_i (½ + ½ log 2π + log s_i)`.
pub fn gaussian_entropy(sd: &[f64]) -> f64 {
    sd.iter().map(|s| 0.5 + HALF_LN_2PI + s.ln()).sum()
}
