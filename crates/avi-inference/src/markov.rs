//! The structured (Gauss–Markov) local family, `"structure": "markov"`
//! (issue 20): for scalar local latents that form a chain,
//!
//! ```text
//! q(z) = q(z_1) ∏_{n≥2} q(z_n | z_{n−1})
//! z_1 = m_1 + s_1 ε_1,   z_n = a_n z_{n−1} + m_n + s_n ε_n,   ε_n ~ N(0, 1)
//! ```
//!
//! with per-observation parameters `(a_n, m_n, log s_n)`: the raw `[N, 3]`
//! rows of [`crate::Output::Markov`] (`a_1` is read but unused). F-VI makes
//! them free; A-VI makes them the inference function's output on the window
//! of x_n. The exact posterior of a Gaussian HMM with θ known is a forward
//! Gauss–Markov chain, so this family contains it.
//!
//! **Density.** The map ε ↦ z is lower triangular with diagonal s_n, so
//! `log q(z) = Σ_n [−log s_n − ½ ε_n² − ½ log 2π]` with ε_n the standard
//! normals that gave z, and the entropy is exactly
//! `H = Σ_n log s_n + (N/2) log(2πe)`: the mean-field estimators of
//! [`crate::elbo`] (analytic or sampled −log q) apply unchanged, given
//! `Σ log s_n` and the draws' ε.
//!
//! **Sampling.** The recurrence is a first-order linear scan; it is computed
//! in ⌈log₂ N⌉ rounds of whole-tensor operations (Hillis–Steele doubling
//! on the affine maps `y ↦ a_n y + u_n`, with no division, so a_n = 0 is
//! fine): O(M N log N) work, and O(M N log N) memory kept for the
//! backward pass, per step for M draws; differentiable by autograd. A plain loop over n is the reference it is
//! tested against.
//!
//! **Marginals.** `mean_n = a_n mean_{n−1} + m_n` and
//! `var_n = a_n² var_{n−1} + s_n²`, the same scan; the report's `q_z`
//! gives these marginal means and standard deviations.
//!
//! Only the libtorch engine fits this family (its gradients come from
//! autograd); the others refuse it and `"auto"` picks libtorch.

use std::any::Any;

use avi_models::{GaussianHmm, Model, SawModel};
use tch::Tensor;

use crate::family::GaussianParams;
use crate::{InferenceError, Result};

/// Number of raw values per observation: `(a_n, m_n, log s_n)`.
pub(crate) const WIDTH: usize = 3;

/// `y_1 = u_1`, `y_n = a_n y_{n−1} + u_n` along the last dimension of `u`
/// (`[..., N]`), `a` `[N]` (`a_1` unused), by doubling: after the round
/// with offset d, `(A_n, U_n)` is the composition of the maps n−2d+1..n,
/// so ⌈log₂ N⌉ rounds cover every n.
pub(crate) fn scan(a: &Tensor, u: &Tensor) -> Tensor {
    let n = u.size().last().copied().unwrap_or(0);
    let last = u.dim() as i64 - 1;
    // The first map has no predecessor: A_1 = 0.
    let mut big_a = if n > 0 {
        Tensor::cat(&[a.narrow(0, 0, 1).zeros_like(), a.narrow(0, 1, n - 1)], 0)
    } else {
        a.shallow_clone()
    };
    let mut big_u = u.shallow_clone();
    let mut d = 1;
    while d < n {
        // Shifted by d; the identity map (A = 1, U = 0) before the start.
        let mut pad_shape = big_u.size();
        *pad_shape.last_mut().expect("u has a last dimension") = d;
        let u_prev = Tensor::cat(
            &[
                Tensor::zeros(&pad_shape, (u.kind(), u.device())),
                big_u.narrow(last, 0, n - d),
            ],
            last,
        );
        let a_prev = Tensor::cat(
            &[
                Tensor::ones([d], (a.kind(), a.device())),
                big_a.narrow(0, 0, n - d),
            ],
            0,
        );
        // Out of place: the first `big_u` is the caller's `u`.
        big_u = big_u.g_add(&(&big_a * u_prev));
        big_a = &big_a * a_prev;
        d *= 2;
    }
    big_u
}

/// The `[N]` columns `(a, m, log s)` of raw `[N, 3]` rows.
fn columns(raw: &Tensor) -> (Tensor, Tensor, Tensor) {
    (raw.select(1, 0), raw.select(1, 1), raw.select(1, 2))
}

/// Reparameterised draws of the chain from standard normals `eps`
/// (`[M, N, 1]`): returns `z` (`[M, N, 1]`) and `Σ_n log s_n` (a scalar),
/// what −log q needs besides ε.
pub(crate) fn sample(raw: &Tensor, eps: &Tensor) -> (Tensor, Tensor) {
    let (a, m, log_s) = columns(raw);
    let u = m + log_s.exp() * eps.squeeze_dim(2);
    let z = scan(&a, &u).unsqueeze(2);
    (z, log_s.sum(log_s.kind()))
}

/// The marginals q(z_n) of the chain: `[N, 1]` means and log-sds
/// (differentiable).
pub(crate) fn marginals(raw: &Tensor) -> GaussianParams {
    let (a, m, log_s) = columns(raw);
    let mean = scan(&a, &m);
    let var = scan(&a.square(), &log_s.multiply_scalar(2.0).exp());
    GaussianParams {
        mean: mean.unsqueeze(1),
        log_sd: var.log().multiply_scalar(0.5).unsqueeze(1),
    }
}

/// Check that `model`'s local latents are scalars that form a chain (its
/// prior links z_n to z_{n−1} at most): the Gaussian HMM and the saw model
/// (whose z_n are independent given θ and x, a chain with a_n = 0).
/// Anything else is refused, naming the model.
pub(crate) fn check_model(model: &dyn Model) -> Result<()> {
    let any: &dyn Any = model;
    if any.is::<GaussianHmm>() || any.is::<SawModel>() {
        Ok(())
    } else {
        Err(InferenceError::config(
            "method.structure",
            format!(
                "\"markov\" needs scalar local latents that form a chain (the gaussian_hmm and saw models), not {}",
                model.name()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The plain loop `y_n = a_n y_{n−1} + u_n`.
    fn looped(a: &Tensor, u: &Tensor) -> Tensor {
        let n = u.size()[1];
        let mut cols = vec![u.select(1, 0)];
        for i in 1..n {
            let next = a.get(i) * &cols[i as usize - 1] + u.select(1, i);
            cols.push(next);
        }
        Tensor::stack(&cols, 1)
    }

    /// The doubling scan equals the loop for every N from 1 to 40, a_n of
    /// both signs and zeros included (1e-12 absolute: the same products in
    /// a different association, values of order 10).
    #[test]
    fn scan_equals_the_loop() {
        let _generator = crate::rng::test_serial();
        tch::manual_seed(5);
        for n in 1..=40 {
            let opts = (Kind::Double, Device::Cpu);
            let a = Tensor::rand([n], opts).multiply_scalar(1.8) - 0.9;
            let _ = a.get(n / 2).fill_(0.0);
            let u = Tensor::randn([4, n], opts);
            let d = (scan(&a, &u) - looped(&a, &u))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-12, "n = {n}: {d}");
        }
    }

    /// The marginal variances of the chain equal the sample variances of
    /// many draws (200,000 draws: relative SE of a variance √(2/M) ≈ 0.3%;
    /// tolerance 2%), and the means likewise (SE sd/√M; tolerance 5 SE).
    #[test]
    fn marginals_match_draws() {
        let _generator = crate::rng::test_serial();
        tch::manual_seed(8);
        let opts = (Kind::Double, Device::Cpu);
        let n = 12;
        let raw = Tensor::stack(
            &[
                Tensor::rand([n], opts) - 0.2,
                Tensor::randn([n], opts),
                Tensor::randn([n], opts).multiply_scalar(0.3),
            ],
            1,
        );
        let eps = Tensor::randn([200_000, n, 1], opts);
        let (z, sum_log_s) = sample(&raw, &eps);
        let q = marginals(&raw);
        let sd = q.log_sd.exp().squeeze_dim(1);
        let mean = q.mean.squeeze_dim(1);
        let z = z.squeeze_dim(2);
        let rel = (z.var_dim(0, true, false) / sd.square() - 1.0)
            .abs()
            .max()
            .double_value(&[]);
        assert!(rel < 0.02, "{rel}");
        let se = &sd / (200_000f64).sqrt();
        let dev = ((z.mean_dim(0, false, Kind::Double) - mean).abs() / se)
            .max()
            .double_value(&[]);
        assert!(dev < 5.0, "{dev}");
        let want = raw.select(1, 2).sum(Kind::Double).double_value(&[]);
        assert!((sum_log_s.double_value(&[]) - want).abs() < 1e-12);
    }
}
