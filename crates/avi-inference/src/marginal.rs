//! The marginal likelihood `log p(x | θ)` at a known θ, for models whose
//! local latents are independent given θ ([`avi_models::Model::has_local_terms`]):
//!
//! ```text
//! log p(x | θ) = Σ_n log ∫ exp(t_n(z)) dz,   t_n(z) = log p(z | θ) + log p(x_n | z, θ),
//! ```
//!
//! the target that the ELBO of a fit with θ fixed bounds from below.
//!
//! **Quadrature** ([`log_marginal_quadrature`], scalar z_n): the composite
//! trapezoid rule on a uniform grid of G points over `[−H, H]`, for every n
//! at once (the grid is the batch of "draws" of
//! [`avi_models::Model::local_terms`], `[G, N]`, reduced by log-sum-exp in
//! f64, in chunks of observations). For a smooth integrand that decays
//! within the interval, the trapezoid rule's error falls geometrically as
//! the spacing h shrinks (for a Gaussian-shaped peak of width w, about
//! `exp(−2π² w² / h²)` relative), so the grid is refined by halving h
//! (G → 2G − 1: the new grid contains the old one) until the per-observation
//! values of two successive grids agree: `Σ_n |q_n(h) − q_n(h/2)|` ≤
//! `rel_tol · max(1, |log p(x | θ)|)`. That sum is reported as the error
//! estimate (the finer value, returned, is far closer than that for a
//! geometrically converging rule). The truncation to `[−H, H]` is checked
//! by the weight of the grid's two end points in each integral (reported;
//! an error when above [`QuadratureOptions::max_edge_weight`]). For the
//! linear and nonlinear models (z_n ~ N(0, 1) a priori, a likelihood of at
//! most `1/(√(2π) s_min)`) the mass beyond H = 40 is below
//! `2 Φ(−40) / (√(2π) s_min) < 10⁻³⁴⁸` times the likelihood's largest value:
//! negligible against any integral representable in f64 here.
//!
//! **Importance weighting** ([`log_marginal_iw`], any local dimension): with
//! a proposal q(z_n) (the fitted local factors) and K draws per observation,
//!
//! ```text
//! log p̂(x_n | θ) = log (1/K) Σ_k exp(t_n(z_k) − log q(z_k)),   z_k ~ q(z_n),
//! ```
//!
//! a lower bound of `log p(x_n | θ)` in expectation that tightens as K
//! grows (Burda et al. 2016), summed over n. Its standard error comes from
//! the per-observation estimates being independent: by the delta method
//! `Var(log p̂_n) ≈ (K Σ w² / (Σ w)² − 1) / K` (the relative variance of the
//! mean weight), summed over n. The smallest effective sample size
//! `(Σ w)² / Σ w²` over n is reported: where it is a handful of draws, the
//! delta method (and the bound) is unreliable.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::family::GaussianParams;
use crate::limits::EVAL_CHUNK_ELEMENTS;
use crate::rng::seeded;
use crate::{InferenceError, Result};
use avi_models::{Model, HALF_LN_2PI};

/// Settings of [`log_marginal_quadrature`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuadratureOptions {
    /// H, the grid's half-width in z (default 40).
    pub half_width: f64,
    /// G of the first grid (default 4,097; at least 3).
    pub points: usize,
    /// The largest grid (default 2¹⁸ + 1).
    pub max_points: usize,
    /// The refinement stops when two successive grids agree within
    /// `rel_tol · max(1, |log p(x | θ)|)` (default 1e-10).
    pub rel_tol: f64,
    /// The largest weight of the grid's end points in any observation's
    /// integral (default 1e-20): above it, the interval is too narrow.
    pub max_edge_weight: f64,
}

impl Default for QuadratureOptions {
    fn default() -> Self {
        Self {
            half_width: 40.0,
            points: 4_097,
            max_points: (1 << 18) + 1,
            rel_tol: 1e-10,
            max_edge_weight: 1e-20,
        }
    }
}

/// What [`log_marginal_quadrature`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quadrature {
    /// `log p(x | θ)`, from the finest grid.
    pub log_marginal: f64,
    /// G of the finest grid.
    pub points: usize,
    /// H.
    pub half_width: f64,
    /// `Σ_n |q_n(h) − q_n(h/2)|` between the last two grids (nats).
    pub error_estimate: f64,
    /// The largest weight of the end points in any observation's integral.
    pub edge_weight: f64,
}

/// `[1, D]` θ on `device` in f64, checked against the model.
fn theta_tensor(model: &dyn Model, theta: &[f64], device: Device) -> Result<Tensor> {
    if theta.len() != model.theta_dim() {
        return Err(InferenceError::config(
            "theta",
            format!(
                "{} values, the {} model's θ has {}",
                theta.len(),
                model.name(),
                model.theta_dim()
            ),
        ));
    }
    if theta.iter().any(|t| !t.is_finite()) {
        return Err(InferenceError::config("theta", "a value is not finite"));
    }
    Ok(Tensor::from_slice(theta)
        .to_device(device)
        .view([1, theta.len() as i64]))
}

fn check_terms(model: &dyn Model) -> Result<()> {
    if model.has_local_terms() {
        Ok(())
    } else {
        Err(InferenceError::config(
            "model",
            format!(
                "the {} model has no per-observation terms: log p(x | θ) needs local latents \
                 independent given θ",
                model.name()
            ),
        ))
    }
}

/// Per-observation log integrals `[N]` on a grid of `g` points over
/// `[−h_w, h_w]`, and the largest end-point weight.
fn grid_values(
    model: &dyn Model,
    x: &Tensor,
    theta: &Tensor,
    half_width: f64,
    g: usize,
) -> Result<(Tensor, f64)> {
    let device = x.device();
    let n = x.size()[0];
    let gi = g as i64;
    let h = 2.0 * half_width / (g - 1) as f64;
    let grid = Tensor::linspace(-half_width, half_width, gi, (Kind::Double, device));
    // Trapezoid weights: h inside, h/2 at the two ends.
    let mut log_w = vec![h.ln(); g];
    log_w[0] = (h / 2.0).ln();
    log_w[g - 1] = (h / 2.0).ln();
    let log_w = Tensor::from_slice(&log_w).to_device(device).unsqueeze(1); // [G, 1]
    let per_point = model.work_per_observation().max(1);
    let chunk = (EVAL_CHUNK_ELEMENTS / (g * per_point)).max(1) as i64;
    let theta = theta.expand([gi, theta.size()[1]], false);
    let mut parts = Vec::new();
    let mut edge = f64::NEG_INFINITY;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let xs = x.narrow(0, start, len);
        let z = grid.view([gi, 1, 1]).expand([gi, len, 1], false);
        let terms = model.local_terms(&theta, &z, &xs)? + &log_w; // [G, len]
        let q = terms.logsumexp([0].as_slice(), false); // [len]
        let ends = terms
            .get(0)
            .maximum(&terms.get(gi - 1))
            .f_sub(&q)?
            .max()
            .double_value(&[]);
        edge = edge.max(ends);
        parts.push(q);
        start += len;
    }
    Ok((Tensor::cat(&parts, 0), edge.exp()))
}

/// `log p(x | θ)` by adaptive trapezoid quadrature over scalar z_n (see the
/// module docs), in f64 on `x`'s device; `theta` is θ's D values.
pub fn log_marginal_quadrature(
    model: &dyn Model,
    x: &Tensor,
    theta: &[f64],
    opts: &QuadratureOptions,
) -> Result<Quadrature> {
    check_terms(model)?;
    if model.local_dim() != 1 || model.local_states().is_some() {
        return Err(InferenceError::config(
            "model",
            format!(
                "quadrature needs a scalar continuous local latent; the {} model's z_n has {} \
                 values (use importance weighting)",
                model.name(),
                model.local_dim()
            ),
        ));
    }
    if !(opts.half_width.is_finite() && opts.half_width > 0.0)
        || opts.points < 3
        || opts.max_points < opts.points
        || opts.rel_tol.is_nan()
        || opts.rel_tol <= 0.0
    {
        return Err(InferenceError::config(
            "quadrature",
            format!("{opts:?}: needs H > 0, 3 ≤ points ≤ max_points and rel_tol > 0"),
        ));
    }
    let x = x.to_kind(Kind::Double);
    model.check_data(&x)?;
    let theta = theta_tensor(model, theta, x.device())?;
    tch::no_grad(|| {
        let mut g = opts.points;
        let (mut coarse, _) = grid_values(model, &x, &theta, opts.half_width, g)?;
        loop {
            let fine_g = 2 * g - 1;
            let (fine, edge) = grid_values(model, &x, &theta, opts.half_width, fine_g)?;
            let total = fine.sum(Kind::Double).double_value(&[]);
            let err = (&fine - &coarse).abs().sum(Kind::Double).double_value(&[]);
            if !total.is_finite() {
                return Err(InferenceError::NonFinite(format!(
                    "log p(x | θ) by quadrature is {total}"
                )));
            }
            let done = err <= opts.rel_tol * total.abs().max(1.0);
            if done || 2 * fine_g - 1 > opts.max_points {
                if edge > opts.max_edge_weight {
                    return Err(InferenceError::config(
                        "quadrature",
                        format!(
                            "the grid's ends carry {edge:.1e} of an integral (more than {:.0e}): \
                             widen half_width beyond {}",
                            opts.max_edge_weight, opts.half_width
                        ),
                    ));
                }
                if !done {
                    return Err(InferenceError::config(
                        "quadrature",
                        format!(
                            "{fine_g} points still differ by {err:.2e} nats from {g} (tolerance \
                             {:.1e}): raise max_points",
                            opts.rel_tol * total.abs().max(1.0)
                        ),
                    ));
                }
                return Ok(Quadrature {
                    log_marginal: total,
                    points: fine_g,
                    half_width: opts.half_width,
                    error_estimate: err,
                    edge_weight: edge,
                });
            }
            g = fine_g;
            coarse = fine;
        }
    })
}

/// What [`log_marginal_iw`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IwEstimate {
    /// The importance-weighted estimate of `log p(x | θ)` (a lower bound
    /// in expectation).
    pub log_marginal: f64,
    /// Its Monte Carlo standard error (delta method, summed over n).
    pub se: f64,
    /// K, the draws per observation.
    pub samples: usize,
    /// The smallest effective sample size `(Σ w)² / Σ w²` over n.
    pub min_ess: f64,
    /// Seed of the draws.
    pub seed: u64,
}

/// The importance-weighted estimate of `log p(x | θ)` with the Gaussian
/// proposal `proposal` (means and log-sds `[N, L]`, as the local factors
/// of a fit) and K = `samples` draws per observation seeded with `seed`
/// (see the module docs), in f64 on `x`'s device.
pub fn log_marginal_iw(
    model: &dyn Model,
    x: &Tensor,
    theta: &[f64],
    proposal: &GaussianParams,
    samples: usize,
    seed: u64,
) -> Result<IwEstimate> {
    check_terms(model)?;
    if model.local_states().is_some() {
        return Err(InferenceError::config(
            "model",
            "importance weighting here draws continuous local latents",
        ));
    }
    if !(2..=crate::options::MAX_DRAWS).contains(&samples) {
        return Err(InferenceError::config(
            "iw_samples",
            format!(
                "{samples}: must be in 2..={} (the standard error needs two)",
                crate::options::MAX_DRAWS
            ),
        ));
    }
    let x = x.to_kind(Kind::Double);
    model.check_data(&x)?;
    let device = x.device();
    let n = x.size()[0];
    let l = model.local_dim() as i64;
    let mean = proposal.mean.to_device(device).to_kind(Kind::Double);
    let log_sd = proposal.log_sd.to_device(device).to_kind(Kind::Double);
    if mean.size() != [n, l] || log_sd.size() != [n, l] {
        return Err(InferenceError::config(
            "proposal",
            format!(
                "means {:?} and log-sds {:?}, expected [{n}, {l}] each",
                mean.size(),
                log_sd.size()
            ),
        ));
    }
    let theta = theta_tensor(model, theta, device)?;
    let ((), rng) = seeded(seed, device, || Ok(()))?;
    let per_draw = (n as usize).saturating_mul(model.work_per_observation().max(1));
    let chunk = (EVAL_CHUNK_ELEMENTS / per_draw).clamp(1, samples);
    let sd = log_sd.exp();
    let sum_log_sd = log_sd.sum_dim_intlist(1, false, Kind::Double); // [N]
    tch::no_grad(|| -> Result<IwEstimate> {
        // Running per-n log-sum-exp: max m, Σ exp(lw − m), Σ exp(2(lw − m)).
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        let mut left = samples;
        while left > 0 {
            let k = left.min(chunk) as i64;
            let eps = rng.randn(&[k, n, l], Kind::Double, device)?;
            let z = &mean + &eps * &sd;
            let log_q = eps
                .square()
                .sum_dim_intlist(2, false, Kind::Double)
                .multiply_scalar(-0.5)
                - &sum_log_sd
                - l as f64 * HALF_LN_2PI;
            let terms = model.local_terms(&theta.expand([k, theta.size()[1]], false), &z, &x)?;
            let lw = terms - log_q; // [k, N]
            let chunk_max = lw.amax([0].as_slice(), false);
            state = Some(match state {
                None => {
                    let d = &lw - &chunk_max;
                    (
                        chunk_max,
                        d.exp().sum_dim_intlist(0, false, Kind::Double),
                        (d * 2.0).exp().sum_dim_intlist(0, false, Kind::Double),
                    )
                }
                Some((m, s1, s2)) => {
                    let new_m = m.maximum(&chunk_max);
                    let shift = (&m - &new_m).exp();
                    let d = &lw - &new_m;
                    (
                        new_m,
                        s1 * &shift + d.exp().sum_dim_intlist(0, false, Kind::Double),
                        s2 * shift.square()
                            + (d * 2.0).exp().sum_dim_intlist(0, false, Kind::Double),
                    )
                }
            });
            left -= k as usize;
        }
        let (m, s1, s2) = state.expect("at least two draws");
        let kf = samples as f64;
        let per_n = &m + (&s1 / kf).log();
        let var = (&s2 * kf / s1.square() - 1.0) / kf;
        let ess = s1.square() / &s2;
        let total = per_n.sum(Kind::Double).double_value(&[]);
        let se = var.sum(Kind::Double).double_value(&[]).max(0.0).sqrt();
        let min_ess = ess.min().double_value(&[]);
        if !total.is_finite() || !se.is_finite() {
            return Err(InferenceError::NonFinite(format!(
                "the importance-weighted log p(x | θ) is {total} ± {se}"
            )));
        }
        Ok(IwEstimate {
            log_marginal: total,
            se,
            samples,
            min_ess,
            seed,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use avi_models::{LinearModel, NonlinearModel, NonlinearSim};

    fn proposal(mean: &[f64], sd: &[f64]) -> GaussianParams {
        GaussianParams {
            mean: Tensor::from_slice(mean).view([-1, 1]),
            log_sd: Tensor::from_slice(sd).log().view([-1, 1]),
        }
    }

    /// Linear model: quadrature reaches the closed form `Σ log N(x_n; θ,
    /// σ² + τ²)` to 1e-10 relative (the trapezoid rule on a Gaussian of
    /// width ≥ 0.9 with h ≤ 0.02 is exact to rounding; the tolerance
    /// leaves room for the f64 sum of 300 terms), and its own error
    /// estimate is below the same bound.
    #[test]
    fn quadrature_matches_linear_closed_form() {
        let _s = crate::rng::test_serial();
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let xs = m.simulate(300, 11, Some(0.8)).unwrap();
        let exact = m.log_marginal(0.8, &xs);
        let q = log_marginal_quadrature(
            &m,
            &Tensor::from_slice(&xs),
            &[0.8],
            &QuadratureOptions::default(),
        )
        .unwrap();
        let tol = 1e-10 * exact.abs();
        assert!((q.log_marginal - exact).abs() < tol, "{q:?} vs {exact}");
        assert!(q.error_estimate < tol, "{q:?}");
        assert!(q.edge_weight < 1e-20, "{q:?}");
    }

    /// Linear model, importance weighting: with the exact posterior of z_n
    /// given θ as proposal every weight equals p(x_n | θ), so the estimate
    /// is exact (1e-10 relative, rounding) with a zero standard error
    /// (below 1e-6: rounding in the weights); with a wider, shifted
    /// proposal it lies below the exact value + 3 SE with K = 4 (a lower
    /// bound in expectation) and within 3 SE (plus its bias) with K = 1,000,
    /// its error shrinking from K = 4 to K = 1,000.
    #[test]
    fn iw_matches_linear_closed_form() {
        let _s = crate::rng::test_serial();
        let (tau, sigma, theta) = (1.155f64, 2.43f64, -0.4);
        let m = LinearModel::new(tau, sigma).unwrap();
        let xs = m.simulate(200, 5, Some(theta)).unwrap();
        let x = Tensor::from_slice(&xs);
        let exact = m.log_marginal(theta, &xs);
        let v = sigma * sigma + tau * tau;
        let post_mean: Vec<f64> = xs.iter().map(|x| tau / v * (x - theta)).collect();
        let post_sd = vec![sigma / v.sqrt(); xs.len()];
        let exact_q = proposal(&post_mean, &post_sd);
        let iw = log_marginal_iw(&m, &x, &[theta], &exact_q, 8, 3).unwrap();
        assert!(
            (iw.log_marginal - exact).abs() < 1e-10 * exact.abs(),
            "{iw:?}"
        );
        assert!(iw.se < 1e-6, "{iw:?}");
        let shifted: Vec<f64> = post_mean.iter().map(|m| m + 0.3).collect();
        let wide: Vec<f64> = post_sd.iter().map(|s| s * 1.5).collect();
        let rough = proposal(&shifted, &wide);
        let small = log_marginal_iw(&m, &x, &[theta], &rough, 4, 7).unwrap();
        let large = log_marginal_iw(&m, &x, &[theta], &rough, 1_000, 7).unwrap();
        // K = 1,000: within 3 SE plus the bound's bias (≈ −SE²/2, allowed
        // as SE²); K = 4: a lower bound (its bias, summed over 200
        // observations, outweighs its SE).
        let tol = 3.0 * large.se + large.se * large.se;
        assert!(
            (large.log_marginal - exact).abs() < tol,
            "{large:?} vs {exact}"
        );
        assert!(small.log_marginal < exact + 3.0 * small.se, "{small:?}");
        assert!(
            (large.log_marginal - exact).abs() < (small.log_marginal - exact).abs(),
            "{small:?} {large:?} {exact}"
        );
        assert!(large.se < small.se / 5.0, "{small:?} {large:?}");
    }

    /// Nonlinear model (no closed form): quadrature converges (its
    /// doubling error estimate below 1e-10 relative), importance weighting
    /// with K = 4,000 draws from the prior agrees with it within 3 standard
    /// errors plus the bound's bias (about SE²/2, allowed as SE²), and with
    /// K = 3 it lies below quadrature + 3 SE (a lower bound in
    /// expectation, clearly below here).
    #[test]
    fn iw_agrees_with_quadrature_on_nonlinear() {
        let _s = crate::rng::test_serial();
        let m = NonlinearModel::new(NonlinearSim::Model);
        let theta = 0.5;
        let xs = m.simulate(100, 1789, Some(theta)).unwrap();
        let x = Tensor::from_slice(&xs);
        let q = log_marginal_quadrature(&m, &x, &[theta], &QuadratureOptions::default()).unwrap();
        assert!(q.error_estimate < 1e-10 * q.log_marginal.abs(), "{q:?}");
        let prior = proposal(&vec![0.0; 100], &vec![1.0; 100]);
        let big = log_marginal_iw(&m, &x, &[theta], &prior, 4_000, 1).unwrap();
        let diff = (big.log_marginal - q.log_marginal).abs();
        assert!(diff < 3.0 * big.se + big.se * big.se, "{big:?} vs {q:?}");
        assert!(big.se < 0.5, "{big:?}");
        let small = log_marginal_iw(&m, &x, &[theta], &prior, 3, 1).unwrap();
        assert!(
            small.log_marginal < q.log_marginal + 3.0 * small.se,
            "{small:?} vs {q:?}"
        );
        assert!(small.log_marginal < big.log_marginal, "{small:?} {big:?}");
    }

    /// A model without per-observation terms, a vector latent for
    /// quadrature and a wrong θ are refused.
    #[test]
    fn refusals() {
        let m = LinearModel::new(1.0, 1.0).unwrap();
        let x = Tensor::from_slice(&[0.1f64, 0.2]);
        let opts = QuadratureOptions::default();
        assert!(log_marginal_quadrature(&m, &x, &[0.0, 1.0], &opts).is_err());
        assert!(log_marginal_quadrature(&m, &x, &[f64::NAN], &opts).is_err());
        let bnn = avi_models::BnnModel::new(2, 2, 2).unwrap();
        let xb = Tensor::zeros([3, 2], (Kind::Double, Device::Cpu));
        let theta = vec![0.0; bnn.theta_dim()];
        assert!(log_marginal_quadrature(&bnn, &xb, &theta, &opts).is_err());
        let saw = avi_models::SawModel::new(0.75, 0.0).unwrap();
        assert!(!saw.has_local_terms());
        let q = proposal(&[0.0, 0.0], &[1.0, 1.0]);
        assert!(log_marginal_iw(&saw, &x, &[0.0], &q, 10, 0).is_err());
    }
}
