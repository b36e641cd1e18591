//! # avi-models
//!
//! Probabilistic latent variable models for amortized variational inference
//! research, written on libtorch tensors ([`tch`]). A model has a global
//! latent θ and one local latent `z_n` per observation `x_n`; it knows its
//! log joint density `log p(θ, z, x)` (all normalising constants included,
//! batched over Monte Carlo draws), how to simulate data from itself with a
//! seed, and, where one exists, its exact reference solution (the closed-form
//! optimum of mean-field Gaussian VI).
//!
//! This crate knows nothing about variational families; `avi-inference` fits
//! any [`Model`].
//!
//! ```no_run
//! use avi_models::{LinearModel, Model};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> avi_models::Result<()> {
//! let model = LinearModel::new(1.155, 2.43)?;
//! let x = model.simulate(1_000, 7, None)?;              // Vec<f64>, seeded
//! let reference = model.fvi_optimum(&x)?;               // closed form, f64
//! println!("optimal ELBO = {:.3}", reference.elbo);
//!
//! // Evaluate the log joint at the optimum's means (one "draw").
//! let xt = Tensor::from_slice(&x).to_device(Device::Cpu);
//! let theta = Tensor::from_slice(&reference.theta_mean).view([1, 1]);
//! let z = Tensor::from_slice(&reference.z_mean).view([1, -1, 1]);
//! let lp = model.log_joint(&theta, &z, &xt)?;          // shape [1]
//! # let _ = (lp, Kind::Double);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod bnn;
mod discrete_hmm;
mod error;
pub mod fashion_mnist;
pub mod gaussian;
pub mod gaussian_hmm;
pub mod hmm_reference;
mod linear;
mod mixture;
pub mod mixture_reference;
mod nonlinear;
mod saw;
mod simulate;
#[cfg(test)]
mod test_util;

pub use bnn::{BnnModel, MAX_WIDTH as BNN_MAX_WIDTH};
pub use discrete_hmm::DiscreteHmm;
pub use error::{ModelError, Result};
pub use gaussian::GaussianReference;
pub use gaussian_hmm::GaussianHmm;
pub use linear::LinearModel;
pub use mixture::{MixtureModel, MAX_COMPONENTS};
pub use nonlinear::{NonlinearModel, NonlinearObjective, NonlinearSim};
pub use saw::{SawModel, SawSim};
pub use simulate::{ExactReference, ReferenceElbo, Simulate, CLOSED_FORM};

/// The `tch` crate these models are written against (libtorch's Rust
/// bindings), re-exported so that a model author uses the same version.
pub use tch;

use tch::Tensor;

/// ½ log(2π), the normalising constant of a standard normal density.
pub const HALF_LN_2PI: f64 = 0.918_938_533_204_672_7;

/// A latent variable model `p(θ, z, x) = p(θ) p(z | θ, x) p(x | z, θ)` with a
/// global latent θ ∈ ℝ^D and local latents z_n ∈ ℝ^L, n = 1..N.
///
/// Shape contract of [`Model::log_joint`]: `theta` is `[M, D]`, `z` is
/// `[M, N, L]` (M Monte Carlo draws), `x` is `[N]` for scalar observations
/// (or `[N, d_x]` for vector observations); the result is `[M]`, one log
/// joint per draw, on the device and in the dtype of the inputs. The result
/// is differentiable with respect to `theta` and `z`.
///
/// `Any` is a supertrait so that code holding a `&dyn Model` can recognise
/// a concrete model (an inference engine's specialised form of a shipped
/// model); every `'static` type is `Any`, so a model author writes nothing
/// for it.
pub trait Model: std::any::Any {
    /// A short identifier (`"linear"`, ...), as used in configs.
    fn name(&self) -> &'static str;

    /// D, the number of global latent dimensions.
    fn theta_dim(&self) -> usize;

    /// L, the dimension of each local latent z_n.
    fn local_dim(&self) -> usize;

    /// Check that `x` (shape `[N]` or `[N, d_x]`) is a valid data set for this
    /// model: non-empty, finite and of the right dimension.
    fn check_data(&self, x: &Tensor) -> Result<()>;

    /// `log p(θ, z, x)` for each of M draws, normalising constants included.
    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor>;

    /// `log p(θ)` for each of M draws (`theta` is `[M, D]`), returning `[M]`;
    /// it is one of the terms of [`Model::log_joint`]. A fit with θ fixed
    /// subtracts it, so that its ELBO bounds `log p(x | θ)`.
    fn log_prior(&self, theta: &Tensor) -> Result<Tensor>;

    /// Whether [`Model::local_terms`] is implemented: the model's local
    /// latents are independent given θ, so that its log joint is
    /// `log p(θ) + Σ_n t_n(θ, z_n, x_n)` with one term per observation.
    fn has_local_terms(&self) -> bool {
        false
    }

    /// The model's density per observation: for each of M draws and each
    /// n, `t_n = log p(z_n | θ) + log p(x_n | z_n, θ)` (normalising
    /// constants included), so that `Σ_n t_n + log p(θ)` is
    /// [`Model::log_joint`]. Only models whose local latents are
    /// independent given θ have such terms (not a chain of z_n). Shapes as
    /// in [`Model::log_joint`] (`theta` `[M, D]`, `z` `[M, N, L]`); the
    /// result is `[M, N]`. The default: not supported (an error).
    fn local_terms(&self, _theta: &Tensor, _z: &Tensor, _x: &Tensor) -> Result<Tensor> {
        Err(ModelError::InvalidData(format!(
            "the {} model has no per-observation terms (its local latents are not \
             independent given θ, or the terms are not implemented)",
            self.name()
        )))
    }

    /// Whether [`Model::log_joint_batch`] is implemented (mini-batching).
    fn supports_batches(&self) -> bool {
        false
    }

    /// The log joint with the likelihood restricted to the observations
    /// `batch` (an int64 index tensor) and multiplied by `scale` (N/B for an
    /// unbiased estimate): `log p(θ) + Σ_{all n} log p(z_n | θ) +
    /// scale · Σ_{n ∈ batch} log p(x_n | z_n, θ)` (digest §7 row 10: the prior
    /// of z covers every n each step, as in the authors' code). `[M]`.
    fn log_joint_batch(
        &self,
        _theta: &Tensor,
        _z: &Tensor,
        _x: &Tensor,
        _batch: &Tensor,
        _scale: f64,
    ) -> Result<Tensor> {
        Err(ModelError::InvalidData(format!(
            "the {} model does not support mini-batches",
            self.name()
        )))
    }

    /// For models with discrete local latents: the number K of states of each
    /// z_n (`local_dim` is then K, the number of logits per observation).
    /// `None` (the default) for continuous local latents.
    fn local_states(&self) -> Option<usize> {
        None
    }

    /// For models with discrete local latents: `E_{q(z)}[log p(θ, z, x)]` for
    /// each of M draws of θ (`theta` is `[M, D]`), computed exactly by
    /// enumeration under the factorised `q(z) = ∏_n Cat(z_n; exp(log_probs_n))`
    /// (`log_probs` is `[N, K]`); returns `[M]`, differentiable in both.
    fn expected_log_joint(
        &self,
        _theta: &Tensor,
        _log_probs: &Tensor,
        _x: &Tensor,
    ) -> Result<Tensor> {
        Err(ModelError::InvalidData(format!(
            "the {} model has continuous local latents: use log_joint",
            self.name()
        )))
    }

    /// The number of values d_x of one observation x_n: 1 (the default) for
    /// scalar observations, the row length of `[N, d_x]` data otherwise.
    fn observation_dim(&self) -> usize {
        1
    }

    /// Roughly how many tensor elements [`Model::log_joint`] computes per
    /// draw and per observation (its intermediate tensors), for memory
    /// estimates before a fit: by default L + d_x (one value per local
    /// latent and per observed value). A model whose likelihood evaluates
    /// wider intermediates (a decoder's hidden layers) says so.
    fn work_per_observation(&self) -> usize {
        self.local_dim().saturating_add(self.observation_dim())
    }
}

/// The largest number of observations N a model simulates or a fit accepts
/// (2³⁰ ≈ 1.07·10⁹): far beyond every experiment (at most 6·10⁴ images),
/// and small enough that N times a draw count or an observation's values
/// stays far from `i64` and `usize` overflow.
pub const MAX_OBSERVATIONS: usize = 1 << 30;

/// The largest number of data values N·d_x a model simulates (2³¹, 17 GB as
/// f64): a range guard against overflowing sizes; whether such a data set
/// fits in memory is checked before a fit (`avi_inference::check_fit`).
pub const MAX_DATA_VALUES: usize = 1 << 31;

/// Check a requested sample size before simulating: `n` observations of
/// `values` numbers each, with 1 ≤ n ≤ [`MAX_OBSERVATIONS`] and
/// n·values ≤ [`MAX_DATA_VALUES`].
pub fn check_sample_size(n: usize, values: usize) -> Result<()> {
    if n == 0 {
        return Err(ModelError::InvalidData(
            "cannot simulate an empty data set (n = 0)".into(),
        ));
    }
    if n > MAX_OBSERVATIONS {
        return Err(ModelError::InvalidData(format!(
            "n = {n} observations is more than the largest supported, {MAX_OBSERVATIONS}"
        )));
    }
    match n.checked_mul(values) {
        Some(total) if total <= MAX_DATA_VALUES => Ok(()),
        _ => Err(ModelError::InvalidData(format!(
            "n = {n} observations of {values} values each is more than the largest \
             supported data set, {MAX_DATA_VALUES} values"
        ))),
    }
}

/// Check the `[M, D]` / `[M, N, L]` shape contract of [`Model::log_joint`]
/// (`theta` `[M, theta_dim]`, `z` `[M, N, local_dim]` with N the first
/// dimension of `x`): the first check of a model author's `log_joint`.
pub fn check_draw_shapes(
    theta: &Tensor,
    z: &Tensor,
    x: &Tensor,
    theta_dim: usize,
    local_dim: usize,
) -> Result<()> {
    let ts = theta.size();
    let zs = z.size();
    let n = x.size().first().copied().unwrap_or(0);
    if ts.len() != 2 || ts[1] != theta_dim as i64 {
        return Err(ModelError::Shape {
            what: "theta",
            expected: format!("[M, {theta_dim}]"),
            got: ts,
        });
    }
    if zs.len() != 3 || zs[0] != ts[0] || zs[1] != n || zs[2] != local_dim as i64 {
        return Err(ModelError::Shape {
            what: "z",
            expected: format!("[{}, {n}, {local_dim}]", ts[0]),
            got: zs,
        });
    }
    Ok(())
}

/// `Σ_d log N(θ_d; 0, sd²)` for each row of an `[M, D]` tensor.
pub fn normal_log_prior(theta: &Tensor, sd: f64) -> Tensor {
    let d = theta.size().get(1).copied().unwrap_or(1) as f64;
    theta
        .square()
        .sum_dim_intlist(1, false, theta.kind())
        .divide_scalar(-2.0 * sd * sd)
        - d * (sd.ln() + HALF_LN_2PI)
}

/// `log N(t; 0, 1)`.
pub fn std_normal_log_pdf(t: f64) -> f64 {
    -0.5 * t * t - HALF_LN_2PI
}

/// Check that `x` is a non-empty `[N]` tensor of finite values (the data of
/// a model with scalar observations).
pub fn check_scalar_tensor(model: &str, x: &Tensor) -> Result<()> {
    if x.dim() != 1 {
        return Err(ModelError::InvalidData(format!(
            "the {model} model takes scalar observations (a list of numbers), got shape {:?}",
            x.size()
        )));
    }
    let host = Vec::<f64>::try_from(x.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu))?;
    check_finite_data(&host)
}

/// Check that every value of a host-side data vector is finite and that it is
/// not empty.
pub fn check_finite_data(x: &[f64]) -> Result<()> {
    if x.is_empty() {
        return Err(ModelError::InvalidData("the data set is empty".into()));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(ModelError::InvalidData(format!(
            "x[{i}] = {} is not finite",
            x[i]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample sizes whose vectors would overflow `usize` or take tens of
    /// GB are refused before simulating (before: a capacity-overflow
    /// panic at 2⁶⁴ − 1, a 34 GB allocation near 2³²); the bounds run.
    #[test]
    fn simulations_refuse_oversized_samples() {
        let linear = LinearModel::new(1.0, 1.0).unwrap();
        for n in [0, MAX_OBSERVATIONS + 1, 1 << 32, usize::MAX] {
            assert!(linear.simulate(n, 1, None).is_err(), "{n}");
        }
        let bnn = BnnModel::new(2, 3, 4).unwrap();
        // 2²⁹ images of 4 + 2 values: 3.2·10⁹ values, beyond 2³¹.
        assert!(bnn.simulate(1 << 29, 1, None).is_err());
        assert!(check_sample_size(MAX_OBSERVATIONS, 2).is_ok());
        assert!(check_sample_size(MAX_OBSERVATIONS, 3).is_err());
        assert!(check_sample_size(usize::MAX / 2, usize::MAX).is_err());
        assert_eq!(bnn.simulate(3, 1, None).unwrap().len(), 12);
    }
}
