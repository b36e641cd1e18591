//! The linear probabilistic model of the paper (Eq. 8, digest §3.1).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::Tensor;

use crate::gaussian::{gaussian_entropy, optimal_elbo, GaussianReference};
use crate::{
    check_draw_shapes, check_finite_data, check_scalar_tensor, Model, ModelError, Result,
    HALF_LN_2PI,
};

/// The linear probabilistic model (paper Eq. 8, digest §3.1):
///
/// ```text
/// p(θ) ∝ 1                         (flat, so log p(θ) = 0)
/// z_n ~ N(0, 1)                    n = 1..N
/// x_n | z_n, θ ~ N(θ + τ z_n, σ²)
/// ```
///
/// θ and every z_n are scalars (D = 1, L = 1) and τ, σ > 0 are fixed. The
/// log joint includes every normalising constant of p(z) and p(x | z, θ); the
/// flat prior contributes nothing. The posterior is Gaussian, so the F-VI
/// optimum is closed form ([`LinearModel::fvi_optimum`], Prop. 3.6 with the
/// corrected Lemma A.4: `Φ_0j = τ/σ²`, not `τ/(2σ²)`):
///
/// ```text
/// q*(θ)   = N(x̄, σ²/N)
/// q*(z_n) = N(τ/(σ²+τ²) · (x_n − x̄), σ²/(σ²+τ²))
/// ```
///
/// The paper's experiment uses τ = 1.155, σ = 2.43, N = 10,000.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearModel {
    tau: f64,
    sigma: f64,
}

impl LinearModel {
    /// A linear model with loading `tau` and noise standard deviation
    /// `sigma`; both must be finite and positive.
    pub fn new(tau: f64, sigma: f64) -> Result<Self> {
        if !(tau.is_finite() && tau > 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "tau",
                value: tau,
                reason: "must be finite and > 0",
            });
        }
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "sigma",
                value: sigma,
                reason: "must be finite and > 0",
            });
        }
        Ok(Self { tau, sigma })
    }

    /// The loading τ.
    pub fn tau(&self) -> f64 {
        self.tau
    }

    /// The noise standard deviation σ.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Simulate N observations with a seeded ChaCha8 generator:
    /// θ ~ N(0, 1) (or the given `theta`), z_n ~ N(0, 1),
    /// x_n = θ + τ z_n + σ ε_n (digest §7, row 2).
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<f64>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, 1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let theta = theta.unwrap_or_else(|| StandardNormal.sample(&mut rng));
        Ok((0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                let e: f64 = StandardNormal.sample(&mut rng);
                theta + self.tau * z + self.sigma * e
            })
            .collect())
    }

    /// `log p(θ, z, x)` for one point, in f64 on the host (an independent
    /// evaluation used by the reference solution and by tests).
    pub fn log_joint_f64(&self, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let (t, s) = (self.tau, self.sigma);
        z.iter()
            .zip(x)
            .map(|(&z, &x)| {
                let r = (x - theta - t * z) / s;
                -0.5 * z * z - 0.5 * r * r - s.ln() - 2.0 * HALF_LN_2PI
            })
            .sum()
    }

    /// The exact F-VI optimum (means, standard deviations and ELBO) for data
    /// `x`, computed in closed form in f64.
    ///
    /// The flat prior on θ makes the model shift-equivariant: adding c to
    /// every x_n adds c to θ and leaves z and the density unchanged, so the
    /// optimum's z means, standard deviations and ELBO depend on the data
    /// only through the deviations x_n − x̄. They are computed from those
    /// deviations (taken about the midpoint of the data's range, then
    /// centred), never from x_n − x̄ with a rounded x̄ of large data, so data
    /// far from 0 (all-equal values at 10²⁰) give the same optimum as the
    /// same data near 0. Errors when the data's range is too wide for f64
    /// (deviations or their squares overflow, a range beyond about 10¹⁵⁴):
    /// the closed form cannot be evaluated there.
    pub fn fvi_optimum(&self, x: &[f64]) -> Result<GaussianReference> {
        check_finite_data(x)?;
        let (t, s2) = (self.tau, self.sigma * self.sigma);
        let n = x.len() as f64;
        let (xbar, dev) = centred(x)?;
        let slope = t / (s2 + t * t);
        let z_mean: Vec<f64> = dev.iter().map(|&d| slope * d).collect();
        // Posterior precision diagonal: Φ_00 = N/σ², Φ_nn = 1 + τ²/σ².
        let phi_theta = n / s2;
        let phi_z = 1.0 + t * t / s2;
        // log p(x̄, z, x) = log p(0, z, x − x̄) (shift equivariance).
        let log_joint = self.log_joint_f64(0.0, &z_mean, &dev);
        let elbo = optimal_elbo(
            log_joint,
            std::iter::once(phi_theta).chain(std::iter::repeat_n(phi_z, x.len())),
        );
        if !elbo.is_finite() {
            return Err(ModelError::InvalidData(format!(
                "the linear model's closed-form optimum is not representable in f64 for data \
                 spread over [{:e}, {:e}] (its ELBO overflows)",
                min(x),
                max(x)
            )));
        }
        Ok(GaussianReference {
            theta_mean: vec![xbar],
            theta_sd: vec![phi_theta.sqrt().recip()],
            z_sd: vec![phi_z.sqrt().recip(); x.len()],
            z_mean,
            elbo,
        })
    }

    /// The exact marginal likelihood of the data at a known θ,
    /// `log p(x | θ) = Σ_n log N(x_n; θ, σ² + τ²)` (z_n integrated out in
    /// closed form), in f64: the target of the ELBO of a fit with θ fixed.
    pub fn log_marginal(&self, theta: f64, x: &[f64]) -> f64 {
        let v = self.sigma * self.sigma + self.tau * self.tau;
        x.iter()
            .map(|&x| -0.5 * (x - theta) * (x - theta) / v - 0.5 * v.ln() - HALF_LN_2PI)
            .sum()
    }

    /// The exact ELBO of an arbitrary mean-field Gaussian
    /// `q(θ) = N(m_θ, s_θ²)`, `q(z_n) = N(m_n, s_n²)`, in closed form (no Monte
    /// Carlo error). Used to check fitted solutions without estimator noise.
    pub fn exact_elbo(
        &self,
        x: &[f64],
        theta_mean: f64,
        theta_sd: f64,
        z_mean: &[f64],
        z_sd: &[f64],
    ) -> Result<f64> {
        check_finite_data(x)?;
        if z_mean.len() != x.len() || z_sd.len() != x.len() {
            return Err(ModelError::InvalidData(format!(
                "q(z) has {} means and {} sds for {} observations",
                z_mean.len(),
                z_sd.len(),
                x.len()
            )));
        }
        let (t, s) = (self.tau, self.sigma);
        let mut e_log_p = 0.0;
        for i in 0..x.len() {
            let (m, v) = (z_mean[i], z_sd[i] * z_sd[i]);
            let r = x[i] - theta_mean - t * m;
            let e_r2 = r * r + theta_sd * theta_sd + t * t * v;
            e_log_p += -0.5 * (m * m + v) - 0.5 * e_r2 / (s * s) - s.ln() - 2.0 * HALF_LN_2PI;
        }
        Ok(e_log_p + gaussian_entropy(&[theta_sd]) + gaussian_entropy(z_sd))
    }
}

fn min(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// The mean x̄ of non-empty finite data and the deviations x_n − x̄,
/// computed without forming x_n − x̄ from a rounded x̄ of large values: the
/// deviations are taken about the midpoint m of the data's range (exact
/// differences of nearby values, no overflow of a sum of large values),
/// then centred on their own mean, twice (the second pass removes the
/// rounding of the first); x̄ = m + the mean removed. Errors when a
/// deviation overflows (a range wider than f64::MAX).
fn centred(x: &[f64]) -> Result<(f64, Vec<f64>)> {
    let (lo, hi) = (min(x), max(x));
    let mid = lo / 2.0 + hi / 2.0;
    let n = x.len() as f64;
    let mut dev: Vec<f64> = x.iter().map(|&v| v - mid).collect();
    if dev.iter().any(|d| !d.is_finite()) {
        return Err(ModelError::InvalidData(format!(
            "the data's range [{lo:e}, {hi:e}] is too wide for f64 arithmetic"
        )));
    }
    let mut shift = 0.0;
    for _ in 0..2 {
        // Σ (d / N), not (Σ d) / N: no overflow.
        let mean: f64 = dev.iter().map(|d| d / n).sum();
        dev.iter_mut().for_each(|d| *d -= mean);
        shift += mean;
    }
    Ok((mid + shift, dev))
}

impl Model for LinearModel {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn theta_dim(&self) -> usize {
        1
    }

    fn local_dim(&self) -> usize {
        1
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        check_scalar_tensor("linear", x)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        // Flat prior: log p(θ) = 0 (improper; the posterior is proper).
        Ok(theta.zeros_like().sum_dim_intlist(1, false, theta.kind()))
    }

    fn has_local_terms(&self) -> bool {
        true
    }

    fn local_terms(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        // log N(z_n; 0, 1) + log N(x_n; θ + τ z_n, σ²), the direct form.
        let z = z.squeeze_dim(2); // [M, N]
        let r = (x.unsqueeze(0) - theta - z.multiply_scalar(self.tau)).divide_scalar(self.sigma);
        Ok((z.square() + r.square()).multiply_scalar(-0.5) - (self.sigma.ln() + 2.0 * HALF_LN_2PI))
    }

    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        // Completing the square in z_n (v = σ² + τ², k = τ/v, a = v/σ²):
        //   z² + (x − θ − τz)²/σ² = a (z − k (x − θ))² + (x − θ)²/v,
        // and Σ_n (x_n − θ)² = Σ_n (x_n − x̄)² + N (x̄ − θ)². Both parts are
        // sums of non-negative terms (no cancellation in f32), and the only
        // [M, N] work is one fused `addmm` for r = z − k x + k θ (a rank-2
        // update of z) and one sum of squares, forward and backward.
        let n = x.size()[0];
        let nf = n as f64;
        let (t, s) = (self.tau, self.sigma);
        let v = s * s + t * t;
        let k = t / v;
        let a = v / (s * s);
        let ones = x.ones_like();
        let shift = Tensor::stack(&[x.multiply_scalar(-k), ones.multiply_scalar(k)], 0); // [2, N]
        let lhs = Tensor::cat(&[&theta.ones_like(), theta], 1); // [M, 2] = (1, θ_m)
        let r = z.squeeze_dim(2).addmm(&lhs, &shift); // [M, N]
        let xbar = x.mean(None);
        let ss = (x - &xbar).square().sum(None);
        let quad = r
            .square()
            .sum_dim_intlist(1, false, None)
            .multiply_scalar(a)
            + (theta.squeeze_dim(1) - xbar)
                .square()
                .multiply_scalar(nf / v);
        let constant = nf * (s.ln() + 2.0 * HALF_LN_2PI);
        Ok((quad + ss.divide_scalar(v)).multiply_scalar(-0.5) - constant)
    }
}

#[cfg(test)]
mod tests {
    /// The per-observation terms add up to the log joint (f64, 1e-12
    /// relative: the same terms summed in another order), and the exact
    /// marginal equals a hand value.
    #[test]
    fn local_terms_sum_to_log_joint_and_marginal_by_hand() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let x = Tensor::from_slice(&m.simulate(50, 3, Some(0.8)).unwrap());
        let theta = Tensor::from_slice(&[0.7f64, -1.2]).view([2, 1]);
        let z = Tensor::randn([2, 50, 1], (tch::Kind::Double, tch::Device::Cpu));
        let err = crate::test_util::local_terms_error(&m, &theta, &z, &x);
        assert!(err < 1e-12, "{err}");
        // x = θ: log N(0; 0, v) = −½ log v − ½ log 2π, v = σ² + τ² = 5.
        let m = LinearModel::new(1.0, 2.0).unwrap();
        let want = -0.5 * 5f64.ln() - HALF_LN_2PI;
        assert!((m.log_marginal(0.3, &[0.3]) - want).abs() < 1e-15);
    }

    use super::*;
    use crate::test_util::{compare, rel_err, value_and_grads};

    /// The direct formula: Σ_n log N(z_n; 0, 1) + log N(x_n; θ + τ z_n, σ²).
    fn direct(m: &LinearModel, theta: &Tensor, z: &Tensor, x: &Tensor) -> Tensor {
        let z = z.squeeze_dim(2);
        let resid = (x.unsqueeze(0) - theta - z.multiply_scalar(m.tau())).divide_scalar(m.sigma());
        let per_n = (z.square() + resid.square()).multiply_scalar(-0.5)
            - (m.sigma().ln() + 2.0 * HALF_LN_2PI);
        per_n.sum_dim_intlist(1, false, None)
    }

    /// The completed-square `log_joint` and its gradients equal the direct
    /// formula in f64 (1e-10 relative: both are f64 sums of O(N) terms).
    #[test]
    fn log_joint_matches_direct_formula_f64() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let x = Tensor::from_slice(&m.simulate(500, 3, Some(0.8)).unwrap());
        let theta = Tensor::from_slice(&[0.7f64, -1.2, 3.0]).view([3, 1]);
        let z = Tensor::randn([3, 500, 1], (tch::Kind::Double, tch::Device::Cpu));
        let errs = compare(&m, |t, z, x| direct(&m, t, z, x), &theta, &z, &x);
        assert!(errs.iter().all(|e| *e < 1e-10), "{errs:?}");
    }

    /// In f32 at the paper's size (N = 10,000, 100 draws near the posterior)
    /// the completed-square form is as accurate as the direct one: both are
    /// compared with the direct formula in f64. Measured (value, ∂θ, ∂z)
    /// relative errors (largest error over largest magnitude) are about
    /// (8e-8, 7e-7, 9e-8) for the new form and (2e-7, 5e-7, 1e-7) for the
    /// direct one; the ∂θ error is larger because
    /// ∂θ = Σ_n (x_n − θ − τ z_n)/σ² cancels. Tolerance 1e-5 on the value
    /// and ∂z, 1e-4 on ∂θ, and never more than 10× the direct form's error.
    #[test]
    fn log_joint_f32_at_paper_size() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let n = 10_000;
        let xs = m.simulate(n, 7, Some(0.4)).unwrap();
        let opt = m.fvi_optimum(&xs).unwrap();
        let x = Tensor::from_slice(&xs);
        let d = tch::Kind::Double;
        tch::manual_seed(5);
        let theta =
            Tensor::randn([100, 1], (d, tch::Device::Cpu)) * opt.theta_sd[0] + opt.theta_mean[0];
        let z = Tensor::randn([100, n as i64, 1], (d, tch::Device::Cpu)) * opt.z_sd[0]
            + Tensor::from_slice(&opt.z_mean).view([1, -1, 1]);
        let exact = value_and_grads(|t, z, x| direct(&m, t, z, x), &theta, &z, &x);
        let f = tch::Kind::Float;
        let (tf, zf, xf) = (theta.to_kind(f), z.to_kind(f), x.to_kind(f));
        let new = value_and_grads(|t, z, x| m.log_joint(t, z, x).unwrap(), &tf, &zf, &xf);
        let old = value_and_grads(|t, z, x| direct(&m, t, z, x), &tf, &zf, &xf);
        let errs = |g: &(Tensor, Tensor, Tensor)| {
            [
                rel_err(&g.0.to_kind(d), &exact.0),
                rel_err(&g.1.to_kind(d), &exact.1),
                rel_err(&g.2.to_kind(d), &exact.2),
            ]
        };
        let (e_new, e_old) = (errs(&new), errs(&old));
        eprintln!("f32 relative errors: new {e_new:?}, direct {e_old:?}");
        assert!(
            e_new[0] < 1e-5 && e_new[1] < 1e-4 && e_new[2] < 1e-5,
            "{e_new:?}"
        );
        for (a, b) in e_new.iter().zip(&e_old) {
            assert!(*a <= 10.0 * b.max(1e-7), "{e_new:?} vs {e_old:?}");
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(LinearModel::new(0.0, 1.0).is_err());
        assert!(LinearModel::new(1.0, -1.0).is_err());
        assert!(LinearModel::new(f64::NAN, 1.0).is_err());
        assert!(LinearModel::new(1.0, f64::INFINITY).is_err());
    }

    #[test]
    fn simulation_is_seeded() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        assert_eq!(
            m.simulate(50, 3, None).unwrap(),
            m.simulate(50, 3, None).unwrap()
        );
        assert_ne!(
            m.simulate(50, 3, None).unwrap(),
            m.simulate(50, 4, None).unwrap()
        );
    }

    /// The tensor log joint agrees with the host f64 evaluation. Tolerance
    /// 1e-9 relative: both are f64 sums of ~3N terms of magnitude O(1).
    #[test]
    fn tensor_log_joint_matches_f64() {
        let m = LinearModel::new(0.7, 1.3).unwrap();
        let x = m.simulate(40, 1, Some(0.4)).unwrap();
        let z: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
        let expected = m.log_joint_f64(0.25, &z, &x);
        let xt = Tensor::from_slice(&x);
        let theta = Tensor::from_slice(&[0.25f64]).view([1, 1]);
        let zt = Tensor::from_slice(&z).view([1, 40, 1]);
        let got = m.log_joint(&theta, &zt, &xt).unwrap().double_value(&[0]);
        assert!(
            (got - expected).abs() <= 1e-9 * expected.abs(),
            "{got} vs {expected}"
        );
    }

    /// Hand-derived value for N = 1: x = 1, θ = 0, z = 0, τ = σ = 1 gives
    /// log N(0; 0, 1) + log N(1; 0, 1) = −1/2 − 2·½log 2π.
    #[test]
    fn log_joint_hand_value() {
        let m = LinearModel::new(1.0, 1.0).unwrap();
        let v = m.log_joint_f64(0.0, &[0.0], &[1.0]);
        assert!((v - (-0.5 - 2.0 * HALF_LN_2PI)).abs() < 1e-14);
    }

    /// The closed-form optimum equals the exact posterior moments obtained by
    /// inverting the (N+1)×(N+1) precision numerically, and its ELBO equals
    /// the closed-form ELBO of the same q. Tolerance 1e-9: f64 linear algebra
    /// on a well-conditioned matrix of size 6.
    #[test]
    fn optimum_matches_dense_posterior() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let x = m.simulate(5, 11, None).unwrap();
        let r = m.fvi_optimum(&x).unwrap();
        let (t, s2) = (1.155f64, 2.43f64 * 2.43);
        let n = x.len();
        // Precision Φ and vector b with Φ μ = b for v = (θ, z_1..z_N).
        let mut phi = vec![vec![0.0; n + 1]; n + 1];
        let mut b = vec![0.0; n + 1];
        phi[0][0] = n as f64 / s2;
        b[0] = x.iter().sum::<f64>() / s2;
        for i in 0..n {
            phi[i + 1][i + 1] = 1.0 + t * t / s2;
            phi[0][i + 1] = t / s2;
            phi[i + 1][0] = t / s2;
            b[i + 1] = t * x[i] / s2;
        }
        let a = Tensor::from_slice(&phi.concat()).view([(n + 1) as i64, (n + 1) as i64]);
        let bt = Tensor::from_slice(&b).view([(n + 1) as i64, 1]);
        let mu = Vec::<f64>::try_from(Tensor::linalg_solve(&a, &bt, true).view([-1])).unwrap();
        assert!((mu[0] - r.theta_mean[0]).abs() < 1e-9);
        for i in 0..n {
            assert!((mu[i + 1] - r.z_mean[i]).abs() < 1e-9);
        }
        let exact = m
            .exact_elbo(&x, r.theta_mean[0], r.theta_sd[0], &r.z_mean, &r.z_sd)
            .unwrap();
        assert!((exact - r.elbo).abs() < 1e-9 * r.elbo.abs());
    }

    /// The flat prior on θ makes the optimum shift-equivariant: N = 100
    /// equal values give the same optimal ELBO at 0 and at 10²⁰ (the old
    /// closed form gave −1.67·10¹⁰ there, from x_n − x̄ with a rounded x̄),
    /// equal to the hand value N (−ln σ − ln 2π) + (N + 1) ½ ln 2π
    /// − ½ ln(N/σ²) − (N/2) ln(1 + τ²/σ²) ≈ −191.36. Tolerances: 1e-12
    /// relative between the two data sets (the same f64 operations on zero
    /// deviations; equal in fact) and against the hand value (the same terms
    /// summed in another order, rounding ~1e-14).
    #[test]
    fn optimum_of_equal_data_is_shift_invariant() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let (t, s) = (1.155f64, 2.43f64);
        let n = 100.0;
        let hand = n * (-s.ln() - 2.0 * HALF_LN_2PI) + (n + 1.0) * HALF_LN_2PI
            - 0.5 * (n / (s * s)).ln()
            - 0.5 * n * (1.0 + t * t / (s * s)).ln();
        assert!((hand + 191.36).abs() < 0.01, "{hand}");
        for c in [0.0, 1e20, -3e250] {
            let r = m.fvi_optimum(&[c; 100]).unwrap();
            assert!(
                (r.elbo - hand).abs() <= 1e-12 * hand.abs(),
                "at {c:e}: {} vs {hand}",
                r.elbo
            );
            // θ's mean is the common value: c/2 + c/2 is exact, 1e-15 relative.
            assert!((r.theta_mean[0] - c).abs() <= 1e-15 * c.abs());
            assert!(r.z_mean.iter().all(|z| z.abs() < 1e-300));
        }
    }

    /// Simulated data moved by c = 10¹² (each value rounded to a multiple
    /// of 2⁻¹³ by the move) have the optimum of the moved data moved back
    /// ((x + c) − c is exact): the same ELBO and z means, θ's mean moved by
    /// c. Tolerance 1e-10 relative on the ELBO and 1e-9 absolute on the z
    /// means (deviations of O(1) values are exact differences, so only the
    /// centring's rounding differs, ~1e-16 of the spread); θ's mean within
    /// 1e-3 of the moved mean (the ulp of 10¹² is 1.2e-4).
    #[test]
    fn optimum_moves_with_the_data() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let x = m.simulate(1_000, 4, None).unwrap();
        let c = 1e12;
        let moved: Vec<f64> = x.iter().map(|v| v + c).collect();
        let back: Vec<f64> = moved.iter().map(|v| v - c).collect();
        let (a, b) = (
            m.fvi_optimum(&moved).unwrap(),
            m.fvi_optimum(&back).unwrap(),
        );
        assert!(
            (a.elbo - b.elbo).abs() <= 1e-10 * b.elbo.abs(),
            "{} vs {}",
            a.elbo,
            b.elbo
        );
        let dz = a
            .z_mean
            .iter()
            .zip(&b.z_mean)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(dz < 1e-9, "{dz}");
        assert!((a.theta_mean[0] - c - b.theta_mean[0]).abs() < 1e-3);
    }

    /// Data spread beyond what f64 can square is refused, not answered
    /// with an infinite or NaN ELBO.
    #[test]
    fn optimum_refuses_data_too_wide_for_f64() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        for x in [vec![-1e200, 1e200], vec![-1.7e308, 1.7e308, 0.0]] {
            let e = m.fvi_optimum(&x).unwrap_err().to_string();
            assert!(e.contains("f64"), "{e}");
        }
    }

    /// Perturbing the optimum in any single coordinate lowers the exact ELBO.
    #[test]
    fn optimum_is_a_maximum() {
        let m = LinearModel::new(1.155, 2.43).unwrap();
        let x = m.simulate(20, 5, None).unwrap();
        let r = m.fvi_optimum(&x).unwrap();
        let base = r.elbo;
        let mut zm = r.z_mean.clone();
        zm[3] += 0.05;
        let e1 = m
            .exact_elbo(&x, r.theta_mean[0], r.theta_sd[0], &zm, &r.z_sd)
            .unwrap();
        let mut zs = r.z_sd.clone();
        zs[7] *= 1.1;
        let e2 = m
            .exact_elbo(&x, r.theta_mean[0], r.theta_sd[0], &r.z_mean, &zs)
            .unwrap();
        let e3 = m
            .exact_elbo(
                &x,
                r.theta_mean[0] + 0.05,
                r.theta_sd[0],
                &r.z_mean,
                &r.z_sd,
            )
            .unwrap();
        assert!(e1 < base && e2 < base && e3 < base);
    }
}
