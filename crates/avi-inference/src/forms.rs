//! What the fit needs to know about a model beyond its [`Model`] trait: the
//! per-element form of the scalar models for the fused engine, the
//! initialisation of the variational parameters, and the padding of
//! expanded-domain windows. These are inference ideas, so they live here,
//! not in `avi-models`; the shipped models are recognised by type
//! ([`Model`] has `Any` as a supertrait) and every other model takes the
//! defaults (no fused form, [`Init::default`], padding 0).
//!
//! ## The fused form
//!
//! Elementwise log joints of the scalar models (linear, nonlinear, saw) and
//! their analytic derivatives, on the host in f64, for the fused
//! (autograd-free) gradient engine ([`crate::fused`]). Each of these models
//! factorises as
//!
//! ```text
//! log p(θ, z, x) = log p(θ) + Σ_n ℓ(θ, z_n, x_n, x_{n−1}) + C(N)
//! ```
//!
//! where ℓ depends on one local latent only (the saw model's previous
//! observation x_{n−1} is data, not a latent). [`FusedModel::term`] returns ℓ
//! without its constant together with ∂ℓ/∂z_n and ∂ℓ/∂θ; the constants are in
//! [`FusedModel::constant`] and [`FusedModel::log_prior`]. The sum of the
//! three equals [`Model::log_joint`] (every normalising constant included).
//! The per-element math is kept here, beside the engine that is its only
//! user, rather than with each model: its split into term, constant and
//! previous value is the engine's contract; the models keep their own
//! independent f64 evaluations (`log_joint_f64`), which the tests below
//! compare it with.

use std::any::Any;

use avi_models::{
    BnnModel, LinearModel, Model, NonlinearModel, NonlinearObjective, SawModel, HALF_LN_2PI,
};

use crate::Result;

/// The scalar models with closed-form elementwise derivatives (θ, z_n and
/// x_n scalars).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FusedModel {
    /// [`LinearModel`]: flat prior on θ, z_n ~ N(0, 1),
    /// x_n ~ N(θ + τ z_n, σ²).
    Linear {
        /// The loading τ.
        tau: f64,
        /// The noise standard deviation σ.
        sigma: f64,
    },
    /// [`NonlinearModel`]: θ ~ N(0, 1), z_n ~ N(0, 1),
    /// x_n ~ N(θ + z_n (1 + sin z_n), exp(cos z_n)²).
    Nonlinear,
    /// [`NonlinearModel`] with the authors' objective
    /// ([`NonlinearObjective::Authors`]): flat prior on θ, z_n ~ N(0, 1),
    /// and the Gaussian kernel of x_n without its normaliser −cos z_n.
    NonlinearAuthors,
    /// [`SawModel`]: θ ~ N(0, 1), z_n ~ N(x_{n−1}, 1),
    /// x_n ~ N(α (θ + z_n), 1).
    Saw {
        /// The slope α.
        alpha: f64,
        /// The known x_0.
        x0: f64,
    },
}

impl From<&LinearModel> for FusedModel {
    fn from(m: &LinearModel) -> Self {
        Self::Linear {
            tau: m.tau(),
            sigma: m.sigma(),
        }
    }
}

impl From<&NonlinearModel> for FusedModel {
    fn from(m: &NonlinearModel) -> Self {
        match m.objective() {
            NonlinearObjective::Model => Self::Nonlinear,
            NonlinearObjective::Authors => Self::NonlinearAuthors,
        }
    }
}

impl From<&SawModel> for FusedModel {
    fn from(m: &SawModel) -> Self {
        Self::Saw {
            alpha: m.alpha(),
            x0: m.x0(),
        }
    }
}

impl FusedModel {
    /// The model itself, for everything the fused engine does not replace
    /// (data checks, initialisation, padding, exact evaluation). Fails on
    /// parameters the model rejects.
    pub fn model(&self) -> Result<Box<dyn Model>> {
        Ok(match *self {
            Self::Linear { tau, sigma } => Box::new(LinearModel::new(tau, sigma)?),
            Self::Nonlinear => Box::new(NonlinearModel::default()),
            Self::NonlinearAuthors => {
                Box::new(NonlinearModel::default().with_objective(NonlinearObjective::Authors))
            }
            Self::Saw { alpha, x0 } => Box::new(SawModel::new(alpha, x0)?),
        })
    }

    /// `log p(θ)` and its derivative.
    #[inline]
    pub fn log_prior(&self, theta: f64) -> (f64, f64) {
        match self {
            Self::Linear { .. } | Self::NonlinearAuthors => (0.0, 0.0),
            Self::Nonlinear | Self::Saw { .. } => (-0.5 * theta * theta - HALF_LN_2PI, -theta),
        }
    }

    /// The constant part of `Σ_n ℓ` for N observations (the normalising
    /// constants of p(z_n | ·) and p(x_n | ·) that [`FusedModel::term`]
    /// leaves out).
    pub fn constant(&self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Self::Linear { sigma, .. } => -n * (sigma.ln() + 2.0 * HALF_LN_2PI),
            Self::Nonlinear | Self::NonlinearAuthors | Self::Saw { .. } => -2.0 * n * HALF_LN_2PI,
        }
    }

    /// The value beside x_n that the elementwise term reads: x_{n−1} (x_0 for
    /// n = 1) for the saw model, unused (0) otherwise. `prev[n]` goes with
    /// `x[n]` in [`FusedModel::term`].
    pub fn previous(&self, x: &[f64]) -> Vec<f64> {
        match self {
            Self::Saw { x0, .. } => std::iter::once(*x0)
                .chain(x.iter().copied().take(x.len().saturating_sub(1)))
                .collect(),
            _ => vec![0.0; x.len()],
        }
    }

    /// `(ℓ − constant, ∂ℓ/∂z, ∂ℓ/∂θ)` for one observation `x` with previous
    /// value `prev` (see [`FusedModel::previous`]).
    #[inline]
    pub fn term(&self, theta: f64, z: f64, x: f64, prev: f64) -> (f64, f64, f64) {
        match *self {
            Self::Linear { tau, sigma } => linear_term(tau, sigma.recip(), theta, z, x),
            Self::Nonlinear => nonlinear_term(theta, z, x),
            Self::NonlinearAuthors => nonlinear_authors_term(theta, z, x),
            Self::Saw { alpha, .. } => saw_term(alpha, theta, z, x, prev),
        }
    }
}

/// Linear model, `inv_sigma` = 1/σ: with r = (x − θ − τ z)/σ,
/// ℓ = −½ z² − ½ r², ∂z = −z + τ r/σ, ∂θ = r/σ.
#[inline]
pub fn linear_term(tau: f64, inv_sigma: f64, theta: f64, z: f64, x: f64) -> (f64, f64, f64) {
    let r = (x - theta - tau * z) * inv_sigma;
    let d_theta = r * inv_sigma;
    (-0.5 * (z * z + r * r), tau * d_theta - z, d_theta)
}

/// Nonlinear model: g = z (1 + sin z), g' = 1 + sin z + z cos z,
/// r = (x − θ − g) e^{−cos z}, ℓ = −½ z² − ½ r² − cos z;
/// ∂r/∂z = −g' e^{−cos z} + r sin z, so
/// ∂z = −z + r g' e^{−cos z} − r² sin z + sin z and ∂θ = r e^{−cos z}.
#[inline]
pub fn nonlinear_term(theta: f64, z: f64, x: f64) -> (f64, f64, f64) {
    nonlinear_term_with(true, theta, z, x, f64::sin_cos, f64::exp)
}

/// Nonlinear model, the authors' objective: [`nonlinear_term`] without the
/// normaliser −cos z, so ℓ = −½ z² − ½ r²,
/// ∂z = −z + r g' e^{−cos z} − r² sin z and ∂θ = r e^{−cos z}.
#[inline]
pub fn nonlinear_authors_term(theta: f64, z: f64, x: f64) -> (f64, f64, f64) {
    nonlinear_term_with(false, theta, z, x, f64::sin_cos, f64::exp)
}

/// [`nonlinear_term`] (`normalised`) or [`nonlinear_authors_term`] (not)
/// with the caller's sine-and-cosine and exponential (for engines with
/// their own vectorisable versions; `exp` is only called on
/// −cos z ∈ [−1, 1]). `normalised` is a literal at every call, so each
/// inlined copy keeps one branch.
#[inline(always)]
pub fn nonlinear_term_with(
    normalised: bool,
    theta: f64,
    z: f64,
    x: f64,
    sin_cos: impl Fn(f64) -> (f64, f64),
    exp: impl Fn(f64) -> f64,
) -> (f64, f64, f64) {
    let (sin, cos) = sin_cos(z);
    let inv_s = exp(-cos);
    let g = z * (1.0 + sin);
    let dg = 1.0 + sin + z * cos;
    let r = (x - theta - g) * inv_s;
    let d_theta = r * inv_s;
    if normalised {
        let value = -0.5 * (z * z + r * r) - cos;
        let d_z = -z + d_theta * dg + (1.0 - r * r) * sin;
        (value, d_z, d_theta)
    } else {
        let value = -0.5 * (z * z + r * r);
        let d_z = -z + d_theta * dg - r * r * sin;
        (value, d_z, d_theta)
    }
}

/// Saw model: a = z − x_{n−1}, b = x − α (θ + z), ℓ = −½ (a² + b²),
/// ∂z = −a + α b, ∂θ = α b.
#[inline]
pub fn saw_term(alpha: f64, theta: f64, z: f64, x: f64, prev: f64) -> (f64, f64, f64) {
    let a = z - prev;
    let b = x - alpha * (theta + z);
    let d_theta = alpha * b;
    (-0.5 * (a * a + b * b), d_theta - a, d_theta)
}

/// Initialisation of the variational parameters the fit uses for a model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Init {
    /// q(θ): `Some((means, log_sds))`, one value per coordinate of θ (or
    /// one value for every coordinate); `None` draws both from N(0, 1).
    pub theta: Option<(Vec<f64>, Vec<f64>)>,
    /// F-VI's free Gaussian factors: `None` draws means and log-sds from
    /// U[0, 1); `Some(shift)` draws both from N(0, 1) and adds `shift` to the
    /// log-sds.
    pub local_normal_shift: Option<f64>,
}

/// The model's per-element form for the fused CPU engine, when it has one
/// (the shipped scalar models linear, nonlinear and saw); `None` for any
/// other model, a user's own included.
pub fn fused_form(model: &dyn Model) -> Option<FusedModel> {
    let any: &dyn Any = model;
    if let Some(m) = any.downcast_ref::<LinearModel>() {
        Some(m.into())
    } else if let Some(m) = any.downcast_ref::<NonlinearModel>() {
        Some(m.into())
    } else {
        any.downcast_ref::<SawModel>().map(Into::into)
    }
}

/// How variational parameters start for a model: the authors'
/// per-experiment initialisation (digest §4.2–4.5). The BNN's q(θ) starts
/// at mean 0, log-sd −2, and its F-VI factors at m_z ~ N(0, 1),
/// log s_z ~ N(0, 1) − 1; every other model (a user's own included) takes
/// [`Init::default`].
pub fn init_hint(model: &dyn Model) -> Init {
    let any: &dyn Any = model;
    if any.is::<BnnModel>() {
        Init {
            theta: Some((vec![0.0], vec![-2.0])),
            local_normal_shift: Some(-1.0),
        }
    } else {
        Init::default()
    }
}

/// The value that stands for observations before the first and after the
/// last when an expanded-domain inference function looks past the data:
/// the saw model's known `x_0`, 0 for every other model.
pub fn pad_value(model: &dyn Model) -> f64 {
    let any: &dyn Any = model;
    any.downcast_ref::<SawModel>().map_or(0.0, SawModel::x0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use avi_models::NonlinearSim;

    fn total(m: &FusedModel, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let prev = m.previous(x);
        let s: f64 = (0..x.len())
            .map(|i| m.term(theta, z[i], x[i], prev[i]).0)
            .sum();
        s + m.log_prior(theta).0 + m.constant(x.len())
    }

    /// The fused value equals the host evaluations of each model, and the
    /// derivatives equal central finite differences (h = 1e-5: truncation
    /// error O(h²) ≈ 1e-10 times the third derivative; tolerance 1e-6
    /// absolute + relative).
    #[test]
    fn values_and_derivatives() {
        let lin = LinearModel::new(1.155, 2.43).unwrap();
        let non = NonlinearModel::new(NonlinearSim::Authors);
        let aut = non.with_objective(NonlinearObjective::Authors);
        let saw = SawModel::new(0.75, 0.3).unwrap();
        let z: Vec<f64> = (0..30).map(|i| (i as f64 * 0.77).sin() * 2.5).collect();
        let xl = lin.simulate(30, 1, None).unwrap();
        let xn = non.simulate(30, 1, None).unwrap();
        let xs = saw.simulate(30, 1, None).unwrap();
        let cases = [
            (FusedModel::from(&lin), lin.log_joint_f64(0.4, &z, &xl), xl),
            (
                FusedModel::from(&non),
                non.log_joint_f64(0.4, &z, &xn),
                xn.clone(),
            ),
            (FusedModel::from(&aut), aut.log_joint_f64(0.4, &z, &xn), xn),
            (FusedModel::from(&saw), saw.log_joint_f64(0.4, &z, &xs), xs),
        ];
        for (m, want, x) in cases {
            let got = total(&m, 0.4, &z, &x);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{m:?}: {got} vs {want}"
            );
            let prev = m.previous(&x);
            let h = 1e-5;
            for i in 0..x.len() {
                let (_, dz, dt) = m.term(0.4, z[i], x[i], prev[i]);
                let f = |t: f64, v: f64| m.term(t, v, x[i], prev[i]).0;
                let fd_z = (f(0.4, z[i] + h) - f(0.4, z[i] - h)) / (2.0 * h);
                let fd_t = (f(0.4 + h, z[i]) - f(0.4 - h, z[i])) / (2.0 * h);
                assert!(
                    (dz - fd_z).abs() <= 1e-6 * (1.0 + fd_z.abs()),
                    "{m:?} dz {dz} vs {fd_z}"
                );
                assert!(
                    (dt - fd_t).abs() <= 1e-6 * (1.0 + fd_t.abs()),
                    "{m:?} dθ {dt} vs {fd_t}"
                );
            }
            let (_, dp) = m.log_prior(0.4);
            let fd = (m.log_prior(0.4 + h).0 - m.log_prior(0.4 - h).0) / (2.0 * h);
            assert!((dp - fd).abs() <= 1e-6);
        }
    }

    /// The shipped models are recognised behind `&dyn Model`; others take
    /// the defaults.
    #[test]
    fn recognises_the_shipped_models() {
        let lin = LinearModel::new(1.155, 2.43).unwrap();
        let saw = SawModel::new(0.75, 0.3).unwrap();
        let bnn = BnnModel::new(2, 3, 4).unwrap();
        let hmm = avi_models::GaussianHmm::new(0.9, 1.0, 1.0, 1.0).unwrap();
        assert_eq!(fused_form(&lin), Some(FusedModel::from(&lin)));
        assert_eq!(
            fused_form(&NonlinearModel::default()),
            Some(FusedModel::Nonlinear)
        );
        assert_eq!(
            fused_form(&NonlinearModel::default().with_objective(NonlinearObjective::Authors)),
            Some(FusedModel::NonlinearAuthors)
        );
        let back = FusedModel::NonlinearAuthors.model().unwrap();
        assert_eq!(fused_form(&*back), Some(FusedModel::NonlinearAuthors));
        assert_eq!(fused_form(&saw), Some(FusedModel::from(&saw)));
        assert_eq!(fused_form(&bnn), None);
        assert_eq!(fused_form(&hmm), None);
        assert_eq!(pad_value(&saw).to_bits(), 0.3f64.to_bits());
        assert_eq!(pad_value(&lin).to_bits(), 0.0f64.to_bits());
        assert_eq!(init_hint(&lin), Init::default());
        assert_eq!(
            init_hint(&bnn),
            Init {
                theta: Some((vec![0.0], vec![-2.0])),
                local_normal_shift: Some(-1.0)
            }
        );
    }
}
