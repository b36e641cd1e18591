//! The saw time series (paper Eq. 11 and 17, digest §3.2, §3.4, §4.5).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::Tensor;

use crate::gaussian::{optimal_elbo, ArrowTridiagonal, GaussianReference};
use crate::{
    check_draw_shapes, check_finite_data, check_scalar_tensor, Model, ModelError, Result,
    HALF_LN_2PI,
};

/// How [`SawModel::simulate`] draws the series. Both draw the same noise
/// stream (per step one ε for z_n, then one for x_n), so with one seed they
/// differ only in the recursion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SawSim {
    /// From the model (Eq. 17): z_n = x_{n−1} + ε_n,
    /// x_n = α (θ + z_n) + ε'_n.
    #[default]
    Model,
    /// As the authors' code (`saw_time_series.ipynb`, digest §3.4 and §7
    /// row 5): z_n = x_{n−1} + ε_n is drawn but not used, and
    /// x_n = α (θ + x_{n−1}) + ε'_n, so x_n | x_{n−1} ~ N(α (θ + x_{n−1}), 1)
    /// instead of the model's N(α (θ + x_{n−1}), 1 + α²).
    Authors,
}

/// The saw time-series model (Eq. 17), an expanded-domain example:
///
/// ```text
/// θ ~ N(0, 1)
/// z_n | x_{n−1} ~ N(x_{n−1}, 1)            n = 1..N, x_0 known (default 0)
/// x_n | z_n, θ ~ N(α (θ + z_n), 1)
/// ```
///
/// θ and z_n are scalars. The data hold x_1..x_N; x_0 is a model parameter.
/// Follows the paper's N(0, 1) prior on θ (the authors' code uses a flat
/// prior). [`SawModel::simulate`] draws from the model itself unless
/// [`SawModel::with_sim`] picks the authors' simulator ([`SawSim::Authors`],
/// which uses x_{n−1} in place of z_n; digest §7 row 5); the simulator
/// changes only the data, never the density. The posterior is
/// Gaussian; CAVI gives `q*(z_n) = N((x_{n−1} + α x_n − α² m_θ)/(1+α²),
/// 1/(1+α²))`, a function of (x_{n−1}, x_n): an ideal inference function
/// needs the window [1, 0] (digest §3.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SawModel {
    alpha: f64,
    x0: f64,
    sim: SawSim,
}

impl SawModel {
    /// A saw model with slope `alpha` (finite, ≠ 0) and known `x0` (finite).
    pub fn new(alpha: f64, x0: f64) -> Result<Self> {
        if !(alpha.is_finite() && alpha != 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "alpha",
                value: alpha,
                reason: "must be finite and non-zero",
            });
        }
        if !x0.is_finite() {
            return Err(ModelError::InvalidParameter {
                name: "x0",
                value: x0,
                reason: "must be finite",
            });
        }
        Ok(Self {
            alpha,
            x0,
            sim: SawSim::Model,
        })
    }

    /// The same model with simulator `sim` (the density is unchanged).
    pub fn with_sim(self, sim: SawSim) -> Self {
        Self { sim, ..self }
    }

    /// The simulator choice.
    pub fn sim(&self) -> SawSim {
        self.sim
    }

    /// The slope α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The known x_0.
    pub fn x0(&self) -> f64 {
        self.x0
    }

    /// Simulate x_1..x_N with a seeded ChaCha8 generator, from the model or
    /// the authors' recursion ([`SawSim`]); θ ~ N(0, 1) unless given (the
    /// paper's experiment uses θ = 3.4159, α = 0.75).
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<f64>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, 1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let theta = theta.unwrap_or_else(|| StandardNormal.sample(&mut rng));
        let mut prev = self.x0;
        Ok((0..n)
            .map(|_| {
                let e0: f64 = StandardNormal.sample(&mut rng);
                let z = prev + e0;
                let eps: f64 = StandardNormal.sample(&mut rng);
                let mean_input = match self.sim {
                    SawSim::Model => z,
                    SawSim::Authors => prev,
                };
                prev = self.alpha * (theta + mean_input) + eps;
                prev
            })
            .collect())
    }

    /// `log p(θ, z, x)` in f64 on the host (independent evaluation).
    pub fn log_joint_f64(&self, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let mut lp = -0.5 * theta * theta - HALF_LN_2PI;
        let mut prev = self.x0;
        for (&z, &x) in z.iter().zip(x) {
            let a = z - prev;
            let b = x - self.alpha * (theta + z);
            lp += -0.5 * (a * a + b * b) - 2.0 * HALF_LN_2PI;
            prev = x;
        }
        lp
    }

    /// The posterior precision and `Φ μ = b` right-hand side.
    fn precision(&self, x: &[f64]) -> (ArrowTridiagonal, f64, Vec<f64>) {
        let a2 = self.alpha * self.alpha;
        let n = x.len();
        let phi = ArrowTridiagonal {
            a: 1.0 + n as f64 * a2,
            c: vec![a2; n],
            t: vec![1.0 + a2; n],
            e: vec![0.0; n.saturating_sub(1)],
        };
        let b_theta = self.alpha * x.iter().sum::<f64>();
        let b_z = (0..n)
            .map(|i| if i == 0 { self.x0 } else { x[i - 1] } + self.alpha * x[i])
            .collect();
        (phi, b_theta, b_z)
    }

    /// The exact ELBO (no Monte Carlo error) of a mean-field Gaussian q with
    /// the given moments; `theta` is `None` when θ is fixed at `fixed_theta`.
    pub fn exact_elbo(
        &self,
        x: &[f64],
        theta: Option<(f64, f64)>,
        fixed_theta: Option<f64>,
        z_mean: &[f64],
        z_sd: &[f64],
    ) -> Result<f64> {
        check_finite_data(x)?;
        let (phi, _, _) = self.precision(x);
        gaussian_exact_elbo(&phi, theta, fixed_theta, z_mean, z_sd, |t, z| {
            self.log_joint_f64(t, z, x)
        })
    }

    /// The exact F-VI optimum for data `x` (θ known when `fixed_theta`).
    pub fn fvi_optimum(&self, x: &[f64], fixed_theta: Option<f64>) -> Result<GaussianReference> {
        check_finite_data(x)?;
        let (phi, b_theta, b_z) = self.precision(x);
        gaussian_reference(&phi, b_theta, &b_z, fixed_theta, |t, z| {
            self.log_joint_f64(t, z, x)
        })
    }
}

/// The F-VI optimum of a Gaussian posterior with arrow-tridiagonal precision
/// `phi` and right-hand side (b_θ, b_z); `log_joint(θ, z)` evaluates the log
/// joint. With `fixed_theta` the θ row is dropped and `theta_*` are empty.
pub(crate) fn gaussian_reference(
    phi: &ArrowTridiagonal,
    b_theta: f64,
    b_z: &[f64],
    fixed_theta: Option<f64>,
    log_joint: impl Fn(f64, &[f64]) -> f64,
) -> Result<GaussianReference> {
    let (theta, z) = phi.solve(b_theta, b_z, fixed_theta);
    // With θ fixed the ELBO bounds log p(x | θ): the prior term is left out
    // (every model here has θ ~ N(0, 1)).
    let lj = log_joint(theta, &z) - fixed_theta.map_or(0.0, crate::std_normal_log_pdf);
    let theta_prec: Vec<f64> = if fixed_theta.is_some() {
        vec![]
    } else {
        vec![phi.a]
    };
    let elbo = optimal_elbo(lj, theta_prec.iter().copied().chain(phi.t.iter().copied()));
    if !elbo.is_finite() {
        return Err(ModelError::InvalidData(
            "the optimum is not finite (extreme data?)".into(),
        ));
    }
    Ok(GaussianReference {
        theta_mean: if fixed_theta.is_some() {
            vec![]
        } else {
            vec![theta]
        },
        theta_sd: theta_prec.iter().map(|p| p.sqrt().recip()).collect(),
        z_mean: z,
        z_sd: phi.t.iter().map(|p| p.sqrt().recip()).collect(),
        elbo,
    })
}

/// The exact ELBO of a mean-field Gaussian q (`theta` = q(θ)'s mean and sd,
/// or θ fixed) under a Gaussian target with arrow-tridiagonal precision
/// `phi`; `log_joint(θ, z)` evaluates the log joint (θ ~ N(0, 1), whose
/// prior term is left out when θ is fixed).
pub(crate) fn gaussian_exact_elbo(
    phi: &ArrowTridiagonal,
    theta: Option<(f64, f64)>,
    fixed_theta: Option<f64>,
    z_mean: &[f64],
    z_sd: &[f64],
    log_joint: impl Fn(f64, &[f64]) -> f64,
) -> Result<f64> {
    let n = phi.t.len();
    if z_mean.len() != n || z_sd.len() != n {
        return Err(ModelError::InvalidData(format!(
            "q(z) has {} means and {} sds for {n} observations",
            z_mean.len(),
            z_sd.len()
        )));
    }
    let (theta_mean, mut prec, mut sd) = match (theta, fixed_theta) {
        (Some((m, s)), _) => (m, vec![phi.a], vec![s]),
        (None, Some(t)) => (t, vec![], vec![]),
        (None, None) => {
            return Err(ModelError::InvalidData(
                "q(θ) or a fixed θ is needed".into(),
            ))
        }
    };
    prec.extend(&phi.t);
    sd.extend(z_sd);
    let lj = log_joint(theta_mean, z_mean) - fixed_theta.map_or(0.0, crate::std_normal_log_pdf);
    Ok(crate::gaussian::mean_field_elbo(lj, &prec, &sd))
}

impl Model for SawModel {
    fn name(&self) -> &'static str {
        "saw"
    }

    fn theta_dim(&self) -> usize {
        1
    }

    fn local_dim(&self) -> usize {
        1
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        check_scalar_tensor("saw", x)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(crate::normal_log_prior(theta, 1.0))
    }

    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        let n = x.size()[0];
        let z = z.squeeze_dim(2); // [M, N]
        let prev = Tensor::cat(
            &[
                &x.new_full([1], self.x0, (x.kind(), x.device())),
                &x.narrow(0, 0, n - 1),
            ],
            0,
        );
        // (x − α(θ + z))² = α² (z + θ − x/α)²: the α² is applied to the [M]
        // sum rather than to every element, so each residual costs one
        // broadcast kernel over [M, N] (two for b), and the sums of squares
        // are taken separately instead of adding two [M, N] tensors.
        let a = &z - prev;
        let b = (&z + theta) - x.multiply_scalar(self.alpha.recip());
        let sum_sq = |t: &Tensor| t.square().sum_dim_intlist(1, false, None);
        let quad = sum_sq(&a)
            + sum_sq(&b).multiply_scalar(self.alpha * self.alpha)
            + theta.squeeze_dim(1).square();
        Ok(quad.multiply_scalar(-0.5) - (2 * n + 1) as f64 * HALF_LN_2PI)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::compare;

    /// The direct formula (the paper's Eq. 17 term by term).
    fn direct(m: &SawModel, theta: &Tensor, z: &Tensor, x: &Tensor) -> Tensor {
        let n = x.size()[0];
        let z = z.squeeze_dim(2);
        let x0 = x.new_full([1], m.x0(), (x.kind(), x.device()));
        let prev = Tensor::cat(&[&x0, &x.narrow(0, 0, n - 1)], 0);
        let a = &z - prev.unsqueeze(0);
        let b = x.unsqueeze(0) - (z + theta).multiply_scalar(m.alpha());
        let quad = (a.square() + b.square()).sum_dim_intlist(1, false, None)
            + theta.squeeze_dim(1).square();
        quad.multiply_scalar(-0.5) - (2 * n + 1) as f64 * HALF_LN_2PI
    }

    /// `log_joint` and its gradients equal the direct formula in f64 (1e-10
    /// relative).
    #[test]
    fn log_joint_matches_direct_formula_f64() {
        let m = SawModel::new(0.75, 0.3).unwrap();
        let x = Tensor::from_slice(&m.simulate(300, 2, Some(3.4159)).unwrap());
        let theta = Tensor::from_slice(&[0.7f64, -1.2, 3.0]).view([3, 1]);
        let z = Tensor::randn([3, 300, 1], (tch::Kind::Double, tch::Device::Cpu)) * 2.0;
        let errs = compare(&m, |t, z, x| direct(&m, t, z, x), &theta, &z, &x);
        assert!(errs.iter().all(|e| *e < 1e-10), "{errs:?}");
    }

    /// Tensor log joint vs the f64 host evaluation (tolerance 1e-9 relative:
    /// both f64 sums of O(N) terms).
    #[test]
    fn tensor_log_joint_matches_f64() {
        let m = SawModel::new(0.75, 0.3).unwrap();
        let x = m.simulate(30, 2, Some(1.5)).unwrap();
        let z: Vec<f64> = (0..30).map(|i| (i as f64 * 0.71).cos() * 3.0).collect();
        let want = m.log_joint_f64(0.4, &z, &x);
        let got = m
            .log_joint(
                &Tensor::from_slice(&[0.4f64]).view([1, 1]),
                &Tensor::from_slice(&z).view([1, 30, 1]),
                &Tensor::from_slice(&x),
            )
            .unwrap()
            .double_value(&[0]);
        assert!((got - want).abs() < 1e-9 * want.abs());
    }

    /// Hand value, N = 1, α = 1, x0 = 0, θ = 0, z = 0, x = 1:
    /// log N(0;0,1) + log N(0;0,1) + log N(1;0,1) = −½ − 3·½log 2π.
    #[test]
    fn hand_value() {
        let m = SawModel::new(1.0, 0.0).unwrap();
        let v = m.log_joint_f64(0.0, &[0.0], &[1.0]);
        assert!((v - (-0.5 - 3.0 * HALF_LN_2PI)).abs() < 1e-14);
    }

    /// The optimum's z means are CAVI's closed form given q(θ)'s mean (digest
    /// §3.2), to 1e-10.
    #[test]
    fn optimum_matches_cavi_formula() {
        let m = SawModel::new(0.75, 0.0).unwrap();
        let x = m.simulate(200, 2012, Some(3.4159)).unwrap();
        let r = m.fvi_optimum(&x, None).unwrap();
        let a2 = 0.5625;
        for n in 0..200 {
            let prev = if n == 0 { 0.0 } else { x[n - 1] };
            let want = (prev + 0.75 * x[n] - a2 * r.theta_mean[0]) / (1.0 + a2);
            assert!((r.z_mean[n] - want).abs() < 1e-10);
            assert!((r.z_sd[n] - 0.8).abs() < 1e-12); // 1/sqrt(1.5625)
        }
    }

    /// The noise the simulator draws for seed `seed`: per step (ε_n, ε'_n).
    fn noise(seed: u64, n: usize) -> Vec<(f64, f64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                let e2: f64 = StandardNormal.sample(&mut rng);
                (e, e2)
            })
            .collect()
    }

    /// Both simulators follow their recursions step by step, written out by
    /// hand for N = 3 from the same noise (α = 0.75, θ = 3.4159, x_0 = 0.5):
    /// model x_n = α(θ + x_{n−1} + ε_n) + ε'_n, authors
    /// x_n = α(θ + x_{n−1}) + ε'_n. Tolerance 1e-12 absolute: a few f64
    /// operations on values below 20, done in another order here.
    #[test]
    fn simulators_follow_their_recursions() {
        let (a, t, x0) = (0.75, 3.4159, 0.5);
        let e = noise(7, 3);
        let model = SawModel::new(a, x0).unwrap();
        let authors = model.with_sim(SawSim::Authors);
        assert_eq!(model.sim(), SawSim::Model);
        assert_eq!(authors.sim(), SawSim::Authors);
        let xm = model.simulate(3, 7, Some(t)).unwrap();
        let xa = authors.simulate(3, 7, Some(t)).unwrap();
        let m1 = a * t + a * x0 + a * e[0].0 + e[0].1;
        let m2 = a * t + a * m1 + a * e[1].0 + e[1].1;
        let m3 = a * t + a * m2 + a * e[2].0 + e[2].1;
        let a1 = a * t + a * x0 + e[0].1;
        let a2 = a * t + a * a1 + e[1].1;
        let a3 = a * t + a * a2 + e[2].1;
        for (got, want) in xm.iter().zip([m1, m2, m3]) {
            assert!((got - want).abs() < 1e-12, "model {got} vs {want}");
        }
        for (got, want) in xa.iter().zip([a1, a2, a3]) {
            assert!((got - want).abs() < 1e-12, "authors {got} vs {want}");
        }
        // The first step differs by exactly α ε_1 (same noise, tolerance as
        // above); the two series are not the same.
        assert!(((xm[0] - xa[0]) - a * e[0].0).abs() < 1e-12);
        assert!(xm.iter().zip(&xa).all(|(m, a)| (m - a).abs() > 1e-6));
    }

    /// Over a long series the one-step residual x_n − α(θ + x_{n−1}) has
    /// variance 1 + α² under the model and 1 under the authors' simulator.
    /// N = 20,000: the sample variance's sd is ≈ var·√(2/N) ≈ 0.016 for
    /// 1.5625, so 0.08 (5 sds) separates 1.5625 from 1 with no false fail.
    #[test]
    fn simulators_step_variances() {
        let (a, t) = (0.75, 3.4159);
        let var = |m: SawModel| {
            let x = m.simulate(20_000, 2012, Some(t)).unwrap();
            let mut prev = 0.0;
            let r: Vec<f64> = x
                .iter()
                .map(|&x| {
                    let r = x - a * (t + prev);
                    prev = x;
                    r
                })
                .collect();
            let mean = r.iter().sum::<f64>() / r.len() as f64;
            r.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (r.len() - 1) as f64
        };
        let m = SawModel::new(a, 0.0).unwrap();
        let vm = var(m);
        let va = var(m.with_sim(SawSim::Authors));
        assert!((vm - (1.0 + a * a)).abs() < 0.08, "model {vm}");
        assert!((va - 1.0).abs() < 0.08, "authors {va}");
    }

    /// The simulator choice changes the data only: the same log joint and the
    /// same F-VI optimum for the same x (bit-identical: the same code runs).
    #[test]
    fn authors_sim_keeps_the_density() {
        let m = SawModel::new(0.75, 0.0).unwrap();
        let a = m.with_sim(SawSim::Authors);
        let x = a.simulate(50, 2012, Some(3.4159)).unwrap();
        let z: Vec<f64> = (0..50).map(|i| (i as f64 * 0.3).sin()).collect();
        let lj = |s: &SawModel| s.log_joint_f64(0.2, &z, &x).to_bits();
        assert_eq!(lj(&m), lj(&a));
        let opt = |s: &SawModel| s.fvi_optimum(&x, None).unwrap().elbo.to_bits();
        assert_eq!(opt(&m), opt(&a));
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(SawModel::new(0.0, 0.0).is_err());
        assert!(SawModel::new(f64::NAN, 0.0).is_err());
        assert!(SawModel::new(0.5, f64::INFINITY).is_err());
    }
}
