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
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NonlinearModel {
    sim: NonlinearSim,
}

impl NonlinearModel {
    /// The model, with the given simulator choice.
    pub fn new(sim: NonlinearSim) -> Self {
        Self { sim }
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

    /// `log p(θ, z, x)` in f64 on the host (independent evaluation).
    pub fn log_joint_f64(&self, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let mut lp = -0.5 * theta * theta - HALF_LN_2PI;
        for (&z, &x) in z.iter().zip(x) {
            let s = z.cos().exp();
            let r = (x - theta - z * (1.0 + z.sin())) / s;
            lp += -0.5 * z * z - 0.5 * r * r - z.cos() - 2.0 * HALF_LN_2PI;
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
        Ok(crate::normal_log_prior(theta, 1.0))
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
        let sq_norm = |t: &Tensor| t.norm_scalaropt_dim(2, [1], false).square();
        let g = z.addcmul(&z, &z.sin());
        let shift = Tensor::stack(&[x.neg(), x.ones_like()], 0); // [2, N]
        let lhs = Tensor::cat(&[&theta.ones_like(), theta], 1); // [M, 2] = (1, θ_m)
        let cos = z.cos();
        let r = g.addmm(&lhs, &shift) * cos.neg().exp();
        let quad = sq_norm(&z)
            + sq_norm(&r)
            + cos.sum_dim_intlist(1, false, None).multiply_scalar(2.0)
            + theta.squeeze_dim(1).square();
        Ok(quad.multiply_scalar(-0.5) - (2.0 * n + 1.0) * HALF_LN_2PI)
    }
}

#[cfg(test)]
mod tests {
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

    /// Hand value, N = 1, θ = 0, z = 0, x = 0: s = e, residual 0:
    /// log N(0;0,1) + log N(0;0,1) + log N(0; 0, e²) = −3·½log 2π − 1.
    #[test]
    fn hand_value() {
        let v = NonlinearModel::default().log_joint_f64(0.0, &[0.0], &[0.0]);
        assert!((v - (-3.0 * HALF_LN_2PI - 1.0)).abs() < 1e-14);
    }
}
