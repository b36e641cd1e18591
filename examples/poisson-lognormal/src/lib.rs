//! # A Poisson log-normal model, fitted with avi's public API
//!
//! The model, for n = 1..N:
//!
//! ```text
//! θ = (μ, log σ),   μ ~ N(0, 10²),   log σ ~ N(0, 10²)
//! z_n | θ ~ N(μ, σ²)
//! x_n | z_n ~ Poisson(e^{z_n})
//! ```
//!
//! so the log joint density, every normalising constant included, is
//!
//! ```text
//! log p(θ, z, x) = Σ_{d=1,2} [−θ_d² / (2·10²) − log 10 − ½ log 2π]
//!                + Σ_n [−(z_n − μ)² / (2σ²) − log σ − ½ log 2π]
//!                + Σ_n [x_n z_n − e^{z_n} − log x_n!]
//! ```
//!
//! with one scalar local latent z_n per count x_n. [`PoissonLogNormal`]
//! implements [`avi_models::Model`] for it; [`fit_fvi`] and [`fit_avi`] fit
//! it with F-VI and with an MLP inference function (A-VI); [`local_optimum`]
//! is the exact F-VI optimum of one local factor when θ is known.

use avi_inference::{
    fit, Fit, FitOptions, FunctionConfig, LrStep, MethodConfig, Result as FitResult,
};
use avi_models::tch::{self, Device, Kind, Tensor};
use avi_models::{check_draw_shapes, check_scalar_tensor, Model, ModelError, HALF_LN_2PI};

/// The Poisson log-normal model with independent N(0, `prior_sd`²) priors on
/// μ and log σ (see the crate docs for the density).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoissonLogNormal {
    prior_sd: f64,
}

impl Default for PoissonLogNormal {
    /// The prior sd 10 of the crate docs.
    fn default() -> Self {
        Self { prior_sd: 10.0 }
    }
}

impl PoissonLogNormal {
    /// The model with prior sd `prior_sd` (finite, > 0) on μ and log σ.
    pub fn new(prior_sd: f64) -> avi_models::Result<Self> {
        if !(prior_sd.is_finite() && prior_sd > 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "prior_sd",
                value: prior_sd,
                reason: "must be finite and positive",
            });
        }
        Ok(Self { prior_sd })
    }

    /// N counts simulated with the given μ and σ, reproducibly from `seed`
    /// (libtorch's generator: `tch::manual_seed` is called).
    pub fn simulate(mu: f64, sigma: f64, n: usize, seed: i64) -> avi_models::Result<Vec<f64>> {
        avi_models::check_sample_size(n, 1)?;
        tch::manual_seed(seed);
        let z = Tensor::randn([n as i64], (Kind::Double, Device::Cpu)) * sigma + mu;
        Ok(Vec::<f64>::try_from(z.exp().poisson())?)
    }
}

impl Model for PoissonLogNormal {
    fn name(&self) -> &'static str {
        "poisson-lognormal"
    }

    fn theta_dim(&self) -> usize {
        2
    }

    fn local_dim(&self) -> usize {
        1
    }

    /// Counts: a non-empty `[N]` tensor of finite whole numbers ≥ 0.
    fn check_data(&self, x: &Tensor) -> avi_models::Result<()> {
        check_scalar_tensor(self.name(), x)?;
        let host = Vec::<f64>::try_from(x.to_kind(Kind::Double).to_device(Device::Cpu))?;
        match host.iter().position(|v| *v < 0.0 || v.fract() != 0.0) {
            Some(i) => Err(ModelError::InvalidData(format!(
                "x[{i}] = {} is not a count (a whole number ≥ 0)",
                host[i]
            ))),
            None => Ok(()),
        }
    }

    /// `theta` `[M, 2]`, `z` `[M, N, 1]`, `x` `[N]` → `[M]`.
    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> avi_models::Result<Tensor> {
        check_draw_shapes(theta, z, x, self.theta_dim(), self.local_dim())?;
        let kind = z.kind();
        let mu = theta.select(1, 0).unsqueeze(1); // [M, 1]
        let log_sigma = theta.select(1, 1).unsqueeze(1); // [M, 1]
        let z = z.squeeze_dim(2); // [M, N]
        let x = x.to_kind(kind).unsqueeze(0); // [1, N]
        let log_p_z = ((&z - &mu) * (-&log_sigma).exp()).square() * -0.5 - &log_sigma - HALF_LN_2PI;
        let log_p_x = &x * &z - z.exp() - (&x + 1.0).lgamma();
        Ok(self.log_prior(theta)? + (log_p_z + log_p_x).sum_dim_intlist(1, false, kind))
    }

    fn log_prior(&self, theta: &Tensor) -> avi_models::Result<Tensor> {
        Ok(avi_models::normal_log_prior(theta, self.prior_sd))
    }
}

/// Adam options for this example: `steps` steps at rate 0.05, divided by 5
/// after 40 % of them and by 50 after 70 % (a decaying rate lets the free
/// factors settle below Adam's noise floor at the starting rate), 100 draws
/// per step and the closed-form Gaussian entropy.
pub fn options(steps: usize, seed: u64) -> FitOptions {
    FitOptions {
        steps,
        lr: 0.05,
        seed,
        lr_schedule: vec![
            LrStep {
                from: (steps * 2 / 5).max(2),
                factor: 0.2,
            },
            LrStep {
                from: (steps * 7 / 10).max(3),
                factor: 0.02,
            },
        ],
        ..FitOptions::default()
    }
}

/// The A-VI family of this example: an MLP of two hidden layers of `width`
/// units on the standardised count.
pub fn avi_method(width: usize) -> MethodConfig {
    MethodConfig::Avi {
        function: FunctionConfig::Mlp {
            width,
            depth: 2,
            activation: Default::default(),
            heads: Default::default(),
        },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    }
}

/// F-VI (a free Gaussian factor per count), with θ fixed at `fixed_theta`
/// = `[μ, log σ]` when given, else with a Gaussian q(θ).
pub fn fit_fvi(
    model: &PoissonLogNormal,
    x: &[f64],
    fixed_theta: Option<&[f64]>,
    opts: &FitOptions,
) -> FitResult<Fit> {
    fit_on_cpu(model, x, &MethodConfig::Fvi, fixed_theta, opts)
}

/// A-VI with an MLP of `width` units per hidden layer, θ free.
pub fn fit_avi(
    model: &PoissonLogNormal,
    x: &[f64],
    width: usize,
    opts: &FitOptions,
) -> FitResult<Fit> {
    fit_on_cpu(model, x, &avi_method(width), None, opts)
}

/// The one call of [`avi_inference::fit`] here: on the CPU (the default
/// device), one thread (the default).
///
/// q(θ) starts at μ = 0, σ = 1 with sd e⁻³ in both coordinates
/// ([`avi_inference::FitRequest::init_theta`]), instead of the default
/// N(0, 1) draws of the means and log-sds: a start at log σ = −2 with a
/// wide q(log σ) gives draws of σ near 0 and of e^z near overflow, and the
/// first Monte Carlo gradients are then useless (or not finite). The local
/// factors keep the default start.
fn fit_on_cpu(
    model: &PoissonLogNormal,
    x: &[f64],
    method: &MethodConfig,
    fixed_theta: Option<&[f64]>,
    opts: &FitOptions,
) -> FitResult<Fit> {
    let x = Tensor::from_slice(x);
    let request = fit(model, &x, method)
        .options(opts)
        .fixed_theta(fixed_theta);
    match fixed_theta {
        Some(_) => request.run(),
        None => request.init_theta(&[0.0, 0.0], &[-3.0, -3.0]).run(),
    }
}

/// The F-VI objective of one local factor q(z) = N(m, s²) for the count `x`
/// with θ = (μ, log σ) known: `E_q[log p(x, z | μ, σ)] + H(q)`, in closed
/// form because `E_q[e^z] = e^{m + s²/2}`:
///
/// ```text
/// x·m − e^{m+s²/2} − log x! − ((m−μ)² + s²)/(2σ²) − log σ − ½ log 2π
///   + log s + ½ + ½ log 2π
/// ```
pub fn local_objective(x: f64, mu: f64, sigma: f64, m: f64, s: f64) -> f64 {
    expected_log_joint(x, mu, sigma, m, s) + s.ln() + 0.5 + HALF_LN_2PI
}

/// `E_q[log p(x, z | μ, σ)]` for q = N(m, s²), in closed form.
pub fn expected_log_joint(x: f64, mu: f64, sigma: f64, m: f64, s: f64) -> f64 {
    let var = sigma * sigma;
    x * m
        - (m + 0.5 * s * s).exp()
        - ln_factorial(x)
        - ((m - mu).powi(2) + s * s) / (2.0 * var)
        - sigma.ln()
        - HALF_LN_2PI
}

/// `log x!` by summation (exact to rounding for the counts of this example).
pub fn ln_factorial(x: f64) -> f64 {
    (2..=x as u64).map(|k| (k as f64).ln()).sum()
}

/// The maximiser (m, s) of [`local_objective`]: damped Newton on (m, log s),
/// started at the prior (μ, σ). The objective is concave in (m, s²), so
/// Newton with step halving converges from there; it stops when the
/// gradient is below 1e-12.
pub fn local_optimum(x: f64, mu: f64, sigma: f64) -> (f64, f64) {
    let inv_var = 1.0 / (sigma * sigma);
    let f = |m: f64, u: f64| local_objective(x, mu, sigma, m, u.exp());
    let (mut m, mut u) = (mu, sigma.ln());
    for _ in 0..200 {
        let s2 = (2.0 * u).exp();
        let e = (m + 0.5 * s2).exp();
        let g = [x - e - (m - mu) * inv_var, 1.0 - s2 * (e + inv_var)];
        if g[0].abs().max(g[1].abs()) < 1e-12 {
            break;
        }
        let (hmm, hmu, huu) = (
            -e - inv_var,
            -s2 * e,
            -2.0 * s2 * (e + inv_var) - s2 * s2 * e,
        );
        let det = hmm * huu - hmu * hmu;
        // Newton direction −H⁻¹g (H is negative definite near the optimum);
        // plain gradient ascent where it is not.
        let mut d = if det > 0.0 && hmm < 0.0 {
            [
                -(huu * g[0] - hmu * g[1]) / det,
                -(hmm * g[1] - hmu * g[0]) / det,
            ]
        } else {
            g
        };
        let f0 = f(m, u);
        while f(m + d[0], u + d[1]) < f0 && d[0].abs().max(d[1].abs()) > 1e-16 {
            d = [d[0] * 0.5, d[1] * 0.5];
        }
        m += d[0];
        u += d[1];
    }
    (m, u.exp())
}
