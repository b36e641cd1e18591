//! The nonlinear probabilistic model (paper Eq. 15, digest §3.2, §7 rows 3–4).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::Tensor;

use crate::{check_draw_shapes, check_scalar_tensor, Model, Result, HALF_LN_2PI};

/// How [`NonlinearModel::simulate`] draws the local latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonlinearSim {
    /// From the model: z_n ~ N(0, 1).
    #[default]
    Model,
    /// As the authors' code: z_n ~ N(0, 25) (digest §3.2).
    Authors,
}

/// Which log joint [`NonlinearModel`] evaluates (the target of the fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonlinearObjective {
    /// The model's normalised density (see [`NonlinearModel`]).
    #[default]
    Model,
    /// The authors' code's log joint (digest §3.2): the likelihood without
    /// its normaliser `−cos z_n` and a flat prior on θ. Not a normalised
    /// density.
    Authors,
}

/// The nonlinear probabilistic model (Eq. 15, a simple hierarchical model):
///
/// ```text
/// θ ~ N(0, 1)
/// z_n ~ N(0, 1)
/// x_n | z_n, θ ~ N(θ + z_n (1 + sin z_n), s(z_n)²),   s(z) = exp(cos z)
/// ```
///
/// The paper prints the variance cos²(z_n), which is degenerate where
/// cos z = 0; this follows the authors' code, s(z) = exp(cos z), but keeps
/// the likelihood's normaliser `−log s(z_n) = −cos z_n` (the code drops it,
/// which changes the posterior over z) and the paper's N(0, 1) prior on θ
/// (the code's is flat). All normalising constants are included.
///
/// With [`NonlinearObjective::Authors`] ([`NonlinearModel::with_objective`])
/// the log joint is instead the one the authors' code optimises (digest
/// §3.2):
///
/// ```text
/// log p̃(θ, z, x) = Σ_n [ log N(z_n; 0, 1) − ½ r_n² − ½ log 2π ],
///                  r_n = (x_n − θ − z_n (1 + sin z_n)) / s(z_n),
/// ```
///
/// i.e. the model's log joint + Σ_n cos z_n − log p(θ): the likelihood
/// loses its normaliser `−log s(z_n) = −cos z_n` and θ's prior is flat
/// (log p(θ) = 0). This is not a normalised density in (z, x) (the
/// dropped normaliser depends on z, so it changes the posterior over z),
/// and the flat prior is improper: the ELBO is then not a bound on
/// log p(x) of any model, only the authors' objective. The simulator is
/// unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NonlinearModel {
    sim: NonlinearSim,
    objective: NonlinearObjective,
}

impl NonlinearModel {
    /// The model, with the given simulator choice (and the model's own
    /// objective).
    pub fn new(sim: NonlinearSim) -> Self {
        Self {
            sim,
            objective: NonlinearObjective::Model,
        }
    }

    /// The same model with the given objective (which log joint it
    /// evaluates).
    pub fn with_objective(self, objective: NonlinearObjective) -> Self {
        Self { objective, ..self }
    }

    /// Which log joint the model evaluates.
    pub fn objective(&self) -> NonlinearObjective {
        self.objective
    }

    /// Whether this is the authors' objective.
    fn authors(&self) -> bool {
        self.objective == NonlinearObjective::Authors
    }

    /// Simulate N observations with a seeded ChaCha8 generator; θ ~ N(0, 1)
    /// unless given.
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<f64>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, 1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let theta = theta.unwrap_or_else(|| StandardNormal.sample(&mut rng));
        let z_sd = match self.sim {
            NonlinearSim::Model => 1.0,
            NonlinearSim::Authors => 5.0,
        };
        Ok((0..n)
            .map(|_| {
                let e0: f64 = StandardNormal.sample(&mut rng);
                let z = z_sd * e0;
                let e: f64 = StandardNormal.sample(&mut rng);
                theta + z * (1.0 + z.sin()) + z.cos().exp() * e
            })
            .collect())
    }

    /// `log p(θ, z, x)` in f64 on the host (independent evaluation), of
    /// the model's objective.
    pub fn log_joint_f64(&self, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let authors = self.authors();
        let mut lp = if authors {
            0.0
        } else {
            -0.5 * theta * theta - HALF_LN_2PI
        };
        for (&z, &x) in z.iter().zip(x) {
            let s = z.cos().exp();
            let r = (x - theta - z * (1.0 + z.sin())) / s;
            let normaliser = if authors { 0.0 } else { z.cos() };
            lp += -0.5 * z * z - 0.5 * r * r - normaliser - 2.0 * HALF_LN_2PI;
        }
        lp
    }
}

impl Model for NonlinearModel {
    fn name(&self) -> &'static str {
        "nonlinear"
    }

    fn theta_dim(&self) -> usize {
        1
    }

    fn local_dim(&self) -> usize {
        1
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        check_scalar_tensor("nonlinear", x)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(if self.authors() {
            // The authors' flat prior: log p(θ) = 0.
            theta.zeros_like().sum_dim_intlist(1, false, theta.kind())
        } else {
            crate::normal_log_prior(theta, 1.0)
        })
    }

    fn has_local_terms(&self) -> bool {
        true
    }

    fn local_terms(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        // log N(z_n; 0, 1) + log N(x_n; θ + z_n (1 + sin z_n), exp(cos z_n)²)
        // (the authors' objective drops the normaliser −cos z_n).
        let z = z.squeeze_dim(2); // [M, N]
        let mean = theta + &z * (z.sin() + 1.0);
        let cos = z.cos();
        let r = (x.unsqueeze(0) - mean) * cos.neg().exp();
        let quad = (z.square() + r.square()).multiply_scalar(-0.5) - 2.0 * HALF_LN_2PI;
        Ok(if self.authors() { quad } else { quad - cos })
    }

    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        let n = x.size()[0] as f64;
        let z = z.squeeze_dim(2); // [M, N]

        // g = z (1 + sin z) = z + z·sin z in one `addcmul`; the residual
        // θ + g − x (sign irrelevant once squared) in one `addmm`, a rank-2
        // update (1, θ_m)·(−x; 1) of g; (θ + g − x)/exp(cos z) =
        // (θ + g − x)·exp(−cos z). The three per-n terms are reduced
        // separately (Σ z², Σ r², Σ cos z) rather than summed elementwise.
        // The authors' objective drops Σ cos z and θ² (and θ's ½ log 2π).
        let sq_norm = |t: &Tensor| t.norm_scalaropt_dim(2, [1], false).square();
        let g = z.addcmul(&z, &z.sin());
        let shift = Tensor::stack(&[x.neg(), x.ones_like()], 0); // [2, N]
        let lhs = Tensor::cat(&[&theta.ones_like(), theta], 1); // [M, 2] = (1, θ_m)
        let cos = z.cos();
        let r = g.addmm(&lhs, &shift) * cos.neg().exp();
        if self.authors() {
            let quad = sq_norm(&z) + sq_norm(&r);
            return Ok(quad.multiply_scalar(-0.5) - 2.0 * n * HALF_LN_2PI);
        }
        let quad = sq_norm(&z)
            + sq_norm(&r)
            + cos.sum_dim_intlist(1, false, None).multiply_scalar(2.0)
            + theta.squeeze_dim(1).square();
        Ok(quad.multiply_scalar(-0.5) - (2.0 * n + 1.0) * HALF_LN_2PI)
    }
}

#[cfg(test)]
mod tests {
    /// The per-observation terms add up to the log joint, for both
    /// objectives (f64, 1e-12 relative: the same terms summed in another
    /// order).
    #[test]
    fn local_terms_sum_to_log_joint() {
        let model = NonlinearModel::new(NonlinearSim::Authors);
        let x = Tensor::from_slice(&model.simulate(60, 5, None).unwrap());
        let opts = (tch::Kind::Double, tch::Device::Cpu);
        let theta = Tensor::randn([3, 1], opts);
        let z = Tensor::randn([3, 60, 1], opts) * 2.0;
        for m in [model, model.with_objective(NonlinearObjective::Authors)] {
            let err = crate::test_util::local_terms_error(&m, &theta, &z, &x);
            assert!(err < 1e-12, "{err}");
        }
    }

    use super::*;
    use crate::test_util::compare;

    /// The direct formula, term by term.
    fn direct(theta: &Tensor, z: &Tensor, x: &Tensor) -> Tensor {
        let n = x.size()[0] as f64;
        let z = z.squeeze_dim(2);
        let mean = theta + &z * (z.sin() + 1.0);
        let r = (x.unsqueeze(0) - mean) / z.cos().exp();
        let per_n = (z.square() + r.square()).multiply_scalar(-0.5) - z.cos();
        per_n.sum_dim_intlist(1, false, None)
            - theta.squeeze_dim(1).square().multiply_scalar(0.5)
            - (2.0 * n + 1.0) * HALF_LN_2PI
    }

    /// `log_joint` and its gradients equal the direct formula in f64 (1e-10
    /// relative).
    #[test]
    fn log_joint_matches_direct_formula_f64() {
        let m = NonlinearModel::new(NonlinearSim::Authors);
        let x = Tensor::from_slice(&m.simulate(300, 1789, None).unwrap());
        let theta = Tensor::from_slice(&[0.7f64, -1.2, 3.0]).view([3, 1]);
        let z = Tensor::randn([3, 300, 1], (tch::Kind::Double, tch::Device::Cpu)) * 2.0;
        let errs = compare(&m, direct, &theta, &z, &x);
        assert!(errs.iter().all(|e| *e < 1e-10), "{errs:?}");
    }

    /// Tensor log joint vs f64 host evaluation (1e-9 relative).
    #[test]
    fn tensor_log_joint_matches_f64() {
        let m = NonlinearModel::new(NonlinearSim::Authors);
        let x = m.simulate(40, 1789, None).unwrap();
        let z: Vec<f64> = (0..40).map(|i| (i as f64 * 0.9).sin() * 2.0).collect();
        let want = m.log_joint_f64(0.3, &z, &x);
        let got = m
            .log_joint(
                &Tensor::from_slice(&[0.3f64]).view([1, 1]),
                &Tensor::from_slice(&z).view([1, 40, 1]),
                &Tensor::from_slice(&x),
            )
            .unwrap()
            .double_value(&[0]);
        assert!((got - want).abs() < 1e-9 * want.abs());
    }

    /// The authors' objective equals the model's log joint + Σ_n cos z_n −
    /// log p(θ), value and gradients, on random inputs in f64, both for the
    /// tensor log joint and the host evaluation. Tolerance 1e-10 relative:
    /// the two sides add the same terms (each up to ~10³ here) in different
    /// groupings over N = 300, so they differ by rounding, ~N·ε ≈ 1e-13
    /// relative; a missing or extra per-element term (cos z_n, or θ²/2)
    /// would be off by ≥ 1e-3 relative.
    #[test]
    fn authors_objective_is_the_model_plus_cos_z_minus_prior() {
        let model = NonlinearModel::new(NonlinearSim::Authors);
        let authors = model.with_objective(NonlinearObjective::Authors);
        assert_eq!(authors.objective(), NonlinearObjective::Authors);
        assert_eq!(model.objective(), NonlinearObjective::Model);
        let x = Tensor::from_slice(&model.simulate(300, 7, None).unwrap());
        let opts = (tch::Kind::Double, tch::Device::Cpu);
        let theta = Tensor::randn([4, 1], opts) * 2.0;
        let z = Tensor::randn([4, 300, 1], opts) * 3.0;
        let via_model = |t: &Tensor, z: &Tensor, x: &Tensor| {
            model.log_joint(t, z, x).unwrap()
                + z.cos().sum_dim_intlist([1, 2].as_slice(), false, None)
                - model.log_prior(t).unwrap()
        };
        let errs = compare(&authors, via_model, &theta, &z, &x);
        assert!(errs.iter().all(|e| *e < 1e-10), "{errs:?}");
        // The flat prior is zero.
        let lp = authors.log_prior(&theta).unwrap();
        assert_eq!(lp.size(), [4]);
        assert_eq!(lp.abs().max().double_value(&[]).to_bits(), 0.0f64.to_bits());
        // The host evaluation.
        let xs: Vec<f64> = Vec::try_from(&x).unwrap();
        for m in 0..4 {
            let t = theta.double_value(&[m, 0]);
            let zs: Vec<f64> = Vec::try_from(&z.get(m).squeeze_dim(1)).unwrap();
            let cos: f64 = zs.iter().map(|z| z.cos()).sum();
            let prior = -0.5 * t * t - HALF_LN_2PI;
            let want = model.log_joint_f64(t, &zs, &xs) + cos - prior;
            let got = authors.log_joint_f64(t, &zs, &xs);
            assert!((got - want).abs() <= 1e-10 * want.abs(), "{got} vs {want}");
            let tensor = authors
                .log_joint(&theta.get(m).view([1, 1]), &z.get(m).unsqueeze(0), &x)
                .unwrap()
                .double_value(&[0]);
            assert!(
                (tensor - got).abs() <= 1e-10 * got.abs(),
                "{tensor} vs {got}"
            );
        }
    }

    /// Hand value, N = 1, θ = 0, z = 0, x = 0: s = e, residual 0:
    /// log N(0;0,1) + log N(0;0,1) + log N(0; 0, e²) = −3·½log 2π − 1.
    #[test]
    fn hand_value() {
        let v = NonlinearModel::default().log_joint_f64(0.0, &[0.0], &[0.0]);
        assert!((v - (-3.0 * HALF_LN_2PI - 1.0)).abs() < 1e-14);
        // The authors' objective: no θ prior, no normaliser: −2·½log 2π.
        let v = NonlinearModel::default()
            .with_objective(NonlinearObjective::Authors)
            .log_joint_f64(0.0, &[0.0], &[0.0]);
        assert!((v - (-2.0 * HALF_LN_2PI)).abs() < 1e-14);
    }
}
