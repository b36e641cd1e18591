//! A hidden Markov model with discrete states and Gaussian emissions.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use tch::Tensor;

use crate::hmm_reference::check_probabilities;
use crate::{check_scalar_tensor, Model, ModelError, Result, HALF_LN_2PI};

/// Discrete HMM with Gaussian emissions (paper Eq. 13 with discrete states):
///
/// ```text
/// θ = (μ_1 … μ_K) ~ N(0, p² I)
/// z_1 ~ Cat(π);  z_n | z_{n−1} ~ Cat(A[z_{n−1}, ·])      n = 2..N
/// x_n | z_n, θ ~ N(μ_{z_n}, s²)
/// ```
///
/// With θ known, log p(x | θ) and the exact posterior marginals come from
/// [`crate::hmm_reference::forward_backward`]; the best factorised q(z) is
/// found by [`crate::hmm_reference::mean_field_cavi`]. Every z_n depends on
/// its neighbours a priori, so by Prop. 3.8 no inference function of a
/// strict window of x is ideal in general. π and A must be strictly
/// positive: a zero makes `E_q[log A]` infinite for any softmax q.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteHmm {
    log_pi: Vec<f64>,
    log_a: Vec<f64>,
    emission_sd: f64,
    prior_sd: f64,
}

impl DiscreteHmm {
    /// An HMM with initial probabilities `init` (K), row-stochastic
    /// `transition` (K×K row-major), emission sd and prior sd of the means.
    pub fn new(init: &[f64], transition: &[f64], emission_sd: f64, prior_sd: f64) -> Result<Self> {
        let k = init.len();
        if k == 0 {
            return Err(ModelError::InvalidParameter {
                name: "init",
                value: 0.0,
                reason: "needs K ≥ 1 states",
            });
        }
        check_probabilities("init", init)?;
        if transition.len() != k * k {
            return Err(ModelError::InvalidData(format!(
                "transition has {} values, expected K×K = {}",
                transition.len(),
                k * k
            )));
        }
        for row in transition.chunks(k) {
            check_probabilities("transition", row)?;
        }
        if let Some(&v) = init.iter().chain(transition).find(|&&v| v <= 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "init/transition",
                value: v,
                reason: "probabilities must be > 0 for mean-field VI",
            });
        }
        for (name, v) in [("emission_sd", emission_sd), ("prior_sd", prior_sd)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::InvalidParameter {
                    name,
                    value: v,
                    reason: "must be finite and > 0",
                });
            }
        }
        Ok(Self {
            log_pi: init.iter().map(|v| v.ln()).collect(),
            log_a: transition.iter().map(|v| v.ln()).collect(),
            emission_sd,
            prior_sd,
        })
    }

    /// Number of states K.
    pub fn states(&self) -> usize {
        self.log_pi.len()
    }

    /// π.
    pub fn init(&self) -> Vec<f64> {
        self.log_pi.iter().map(|v| v.exp()).collect()
    }

    /// A, row-major.
    pub fn transition(&self) -> Vec<f64> {
        self.log_a.iter().map(|v| v.exp()).collect()
    }

    /// The emission sd s.
    pub fn emission_sd(&self) -> f64 {
        self.emission_sd
    }

    /// Simulate x_1..x_N with a seeded ChaCha8 generator; θ from its prior
    /// unless given (K values).
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        let k = self.states();
        crate::check_sample_size(n, 1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mu: Vec<f64> = match theta {
            Some(t) if t.len() == k => t.to_vec(),
            Some(t) => {
                return Err(ModelError::InvalidData(format!(
                    "θ has {} values, expected K = {k}",
                    t.len()
                )))
            }
            None => (0..k)
                .map(|_| {
                    self.prior_sd
                        * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng)
                })
                .collect::<Vec<f64>>(),
        };
        let u = Uniform::new(0.0, 1.0).map_err(|e| ModelError::InvalidData(e.to_string()))?;
        let draw = |p: &[f64], r: f64| {
            let mut acc = 0.0;
            for (j, v) in p.iter().enumerate() {
                acc += v.exp();
                if r < acc {
                    return j;
                }
            }
            p.len() - 1
        };
        let mut z = draw(&self.log_pi, u.sample(&mut rng));
        let mut x = Vec::with_capacity(n);
        for i in 0..n {
            if i > 0 {
                z = draw(&self.log_a[z * k..(z + 1) * k], u.sample(&mut rng));
            }
            let e: f64 = StandardNormal.sample(&mut rng);
            x.push(mu[z] + self.emission_sd * e);
        }
        Ok(x)
    }
}

impl Model for DiscreteHmm {
    fn name(&self) -> &'static str {
        "discrete_hmm"
    }

    fn theta_dim(&self) -> usize {
        self.states()
    }

    fn local_dim(&self) -> usize {
        self.states()
    }

    fn local_states(&self) -> Option<usize> {
        Some(self.states())
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        check_scalar_tensor("discrete_hmm", x)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(crate::normal_log_prior(theta, self.prior_sd))
    }

    fn log_joint(&self, _theta: &Tensor, _z: &Tensor, _x: &Tensor) -> Result<Tensor> {
        Err(ModelError::InvalidData(
            "the discrete HMM has discrete z: use expected_log_joint".into(),
        ))
    }

    fn expected_log_joint(&self, theta: &Tensor, log_probs: &Tensor, x: &Tensor) -> Result<Tensor> {
        let k = self.states() as i64;
        let n = x.size()[0];
        let m = theta.size()[0];
        if log_probs.size() != [n, k] || theta.size() != [m, k] {
            return Err(ModelError::Shape {
                what: "theta / log_probs",
                expected: format!("[M, {k}] and [{n}, {k}]"),
                got: [theta.size(), log_probs.size()].concat(),
            });
        }
        let kind = theta.kind();
        let dev = theta.device();
        let q = log_probs.exp();
        let log_pi = Tensor::from_slice(&self.log_pi)
            .to_kind(kind)
            .to_device(dev);
        let log_a = Tensor::from_slice(&self.log_a)
            .to_kind(kind)
            .to_device(dev)
            .view([k, k]);
        let init = (q.get(0) * log_pi).sum(kind);
        let trans = if n > 1 {
            let pair = q
                .narrow(0, 0, n - 1)
                .transpose(0, 1)
                .matmul(&q.narrow(0, 1, n - 1)); // [K, K]
            (pair * log_a).sum(kind)
        } else {
            Tensor::zeros([], (kind, dev))
        };
        let nk = q.sum_dim_intlist(0, false, kind); // [K]
        let sx = q.transpose(0, 1).mv(&x.to_kind(kind)); // [K]
        let s2 = self.emission_sd * self.emission_sd;
        let quad = (x.square().sum(kind)
            - (theta * sx.unsqueeze(0))
                .sum_dim_intlist(1, false, kind)
                .multiply_scalar(2.0)
            + (theta.square() * nk.unsqueeze(0)).sum_dim_intlist(1, false, kind))
        .divide_scalar(-2.0 * s2);
        let emit_const = -(n as f64) * (self.emission_sd.ln() + HALF_LN_2PI);
        let prior = theta
            .square()
            .sum_dim_intlist(1, false, kind)
            .divide_scalar(-2.0 * self.prior_sd * self.prior_sd)
            - k as f64 * (self.prior_sd.ln() + HALF_LN_2PI);
        Ok(quad + init + trans + emit_const + prior)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all K^N paths for a point-mass-free q: with q the
    /// product of the given marginals, E_q[log p(x, z | θ)] equals the
    /// q-weighted sum over paths (K = 2, N = 4, f64, 1e-10 relative).
    #[test]
    fn expected_log_joint_matches_enumeration() {
        let m = DiscreteHmm::new(&[0.6, 0.4], &[0.7, 0.3, 0.2, 0.8], 0.9, 2.0).unwrap();
        let mu = [-1.0, 1.5];
        let x = [0.3, -1.2, 2.0, 1.1];
        let q = [[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8]];
        let (pi, a) = (m.init(), m.transition());
        let mut want = 0.0;
        for path in 0..16usize {
            let z: Vec<usize> = (0..4).map(|i| (path >> i) & 1).collect();
            let w: f64 = (0..4).map(|i| q[i][z[i]]).product();
            let mut lp = pi[z[0]].ln();
            for i in 0..4 {
                if i > 0 {
                    lp += a[z[i - 1] * 2 + z[i]].ln();
                }
                let r = (x[i] - mu[z[i]]) / 0.9;
                lp += -0.5 * r * r - 0.9f64.ln() - HALF_LN_2PI;
            }
            want += w * lp;
        }
        let prior: f64 = mu
            .iter()
            .map(|v| -0.5 * v * v / 4.0 - 2f64.ln() - HALF_LN_2PI)
            .sum();
        want += prior;
        let lp = Tensor::from_slice(&q.concat()).view([4, 2]).log();
        let got = m
            .expected_log_joint(
                &Tensor::from_slice(&mu).view([1, 2]),
                &lp,
                &Tensor::from_slice(&x),
            )
            .unwrap()
            .double_value(&[0]);
        assert!((got - want).abs() < 1e-10 * want.abs(), "{got} vs {want}");
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(DiscreteHmm::new(&[0.5, 0.5], &[0.5, 0.6, 0.5, 0.5], 1.0, 1.0).is_err());
        assert!(DiscreteHmm::new(&[1.0, 0.0], &[0.5, 0.5, 0.5, 0.5], 1.0, 1.0).is_err());
        assert!(DiscreteHmm::new(&[0.5, 0.5], &[0.5, 0.5, 0.5, 0.5], 0.0, 1.0).is_err());
        assert!(DiscreteHmm::new(&[], &[], 1.0, 1.0).is_err());
    }
}
