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
    fit, Dtype, Fit, FitOptions, FunctionConfig, LrStep, MethodConfig, Output, Result as FitResult,
    ThetaFactor, Variational,
};
use avi_models::tch::{self, nn, Device, Kind, Tensor};
use avi_models::{check_draw_shapes, check_scalar_tensor, Model, ModelError, HALF_LN_2PI};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};

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

    /// N counts simulated with the given μ and σ, reproducibly from `seed`:
    /// z_n ~ N(μ, σ²), x_n ~ Poisson(e^{z_n}), drawn with a generator of its
    /// own (ChaCha8), so that fits running in other threads neither disturb
    /// the draws nor are disturbed by them (libtorch's default generator is
    /// process-wide).
    pub fn simulate(mu: f64, sigma: f64, n: usize, seed: u64) -> avi_models::Result<Vec<f64>> {
        avi_models::check_sample_size(n, 1)?;
        if !(mu.is_finite() && sigma.is_finite() && sigma > 0.0) {
            return Err(ModelError::InvalidData(format!(
                "simulate: μ = {mu} and σ = {sigma} must be finite with σ > 0"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let e: f64 = StandardNormal.sample(&mut rng);
                let z = mu + sigma * e;
                let rate = z.exp();
                // rand_distr's Poisson takes a finite positive rate below
                // about 1.8e19 (counts beyond that are not whole f64 numbers)
                let poisson = Poisson::new(rate).map_err(|e| {
                    ModelError::InvalidData(format!("simulate: x[{i}] rate e^{z} = {rate}: {e}"))
                })?;
                Ok(poisson.sample(&mut rng))
            })
            .collect()
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

/// A-VI with an MLP of `width` units per hidden layer ([`avi_method`]), θ
/// free, started at q(θ) of [`theta_start`] and with the MLP's output layer
/// at zero: every q(z_n) starts at N(0, 1).
///
/// Why not the MLP's default start: its layers are drawn at libtorch's
/// scale for ReLU networks, so on standardised counts (up to about 6 for
/// the largest) the initial log-sds reach ±10. A factor with sd e¹⁰ gives
/// draws of z far beyond 88 and 709, where e^z overflows f32 and f64: the
/// first ELBO estimate is not finite and the fit stops at step 1
/// ([`avi_inference::FitStatus::Diverged`]), for about half of the seeds
/// on these data. The hidden layers keep their random start, so the
/// gradient reaches them as soon as the output layer has moved.
pub fn fit_avi(
    model: &PoissonLogNormal,
    x: &[f64],
    width: usize,
    opts: &FitOptions,
) -> FitResult<Fit> {
    let MethodConfig::Avi {
        function,
        standardize,
        window,
        edges,
    } = avi_method(width)
    else {
        unreachable!("avi_method returns an A-VI family")
    };
    let kind = match opts.dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
    };
    let xt = Tensor::from_slice(x);
    let build = |path: &nn::Path, inputs: usize, output: Output| {
        let f = function.build(path, inputs, output, kind)?;
        let head = path / "head";
        tch::no_grad(|| {
            for name in ["weight", "bias"] {
                if let Some(mut t) = head.get(name) {
                    let _ = t.zero_();
                }
            }
        });
        Ok(f)
    };
    // Variational::amortized draws its initial values from libtorch's
    // default generator: seed it as a fit would, holding it meanwhile
    // against fits in other threads.
    let generator = avi_inference::generator_guard();
    tch::manual_seed(opts.seed as i64);
    let var = Variational::amortized(
        model,
        &xt,
        window,
        standardize,
        edges,
        kind,
        Device::Cpu,
        &build,
    )?;
    drop(generator);
    set_theta_start(&var);
    fit(model, &xt, &MethodConfig::Fvi)
        .options(opts)
        .start_from(var)
        .run()
}

/// Where q(θ) starts in this example's fits with θ free: μ = 0, log σ = 0
/// (σ = 1), each with sd e⁻³. The model's default, N(0, 1) draws of the
/// means and log-sds, can start at log σ = −2 with a wide q(log σ): draws of
/// σ near 0 and of e^z near overflow, whose first Monte Carlo gradients are
/// useless (or not finite).
pub fn theta_start() -> ([f64; 2], [f64; 2]) {
    ([0.0, 0.0], [-3.0, -3.0])
}

/// Set q(θ) of a family built by hand (a warm start) to [`theta_start`];
/// nothing when θ is fixed.
pub fn set_theta_start(var: &Variational) {
    if let ThetaFactor::Free(q) = &var.theta {
        let (mean, log_sd) = theta_start();
        // shallow clones share the storage of the trainable tensors
        let (mut m, mut s) = (q.mean.shallow_clone(), q.log_sd.shallow_clone());
        tch::no_grad(|| {
            m.copy_(&Tensor::from_slice(&mean).to_kind(m.kind()));
            s.copy_(&Tensor::from_slice(&log_sd).to_kind(s.kind()));
        });
    }
}

/// The one call of [`avi_inference::fit`] for F-VI here: on the CPU (the
/// default device), one thread (the default), q(θ) started at
/// [`theta_start`] when θ is free. The local factors keep the default
/// start.
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
        None => {
            let (mean, log_sd) = theta_start();
            request.init_theta(&mean, &log_sd).run()
        }
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
