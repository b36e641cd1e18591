//! The Bayesian Gaussian mixture (the design card's mixture model).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use tch::{Kind, Tensor};

use crate::mixture_reference::check_weights;
use crate::{Model, ModelError, Result, HALF_LN_2PI};

/// The largest number of mixture components [`MixtureModel::new`] accepts.
pub const MAX_COMPONENTS: usize = 1 << 16;

/// Bayesian mixture of K Gaussians in ℝ^D with known weights and noise
/// (Blei, Kucukelbir & McAuliffe 2017, §3, in D dimensions):
///
/// ```text
/// μ_k ~ N(0, σ0² I_D)                  k = 1..K       (θ = μ_1 … μ_K, K·D values)
/// z_n ~ Cat(w)                         n = 1..N       (w uniform by default)
/// x_n | z_n, μ ~ N(μ_{z_n}, s² I_D)
/// ```
///
/// A simple hierarchical model with discrete z_n: variational inference
/// enumerates q(z_n) exactly ([`Model::expected_log_joint`]). With θ known
/// the F-VI optimum is the exact posterior `p(z_n | x_n, μ)` and its ELBO
/// equals `log p(x | μ)`; the CAVI reference is
/// [`crate::mixture_reference::cavi`]. Weights must be strictly positive
/// (a zero weight makes `E_q[log w_{z_n}]` infinite for any softmax q).
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureModel {
    k: usize,
    d: usize,
    prior_sd: f64,
    noise_sd: f64,
    log_w: Vec<f64>,
}

impl MixtureModel {
    /// A mixture of `k` components in `d` dimensions; `weights` default to
    /// uniform.
    pub fn new(
        k: usize,
        d: usize,
        prior_sd: f64,
        noise_sd: f64,
        weights: Option<&[f64]>,
    ) -> Result<Self> {
        if k == 0 {
            return Err(ModelError::InvalidParameter {
                name: "k",
                value: 0.0,
                reason: "must be at least 1",
            });
        }
        if d == 0 {
            return Err(ModelError::InvalidData(
                "observations must have at least one dimension".into(),
            ));
        }
        if k > MAX_COMPONENTS {
            return Err(ModelError::InvalidParameter {
                name: "k",
                value: k as f64,
                reason: "is more components than supported (at most 65,536)",
            });
        }
        if k.checked_mul(d).is_none_or(|v| v > crate::MAX_DATA_VALUES) {
            return Err(ModelError::InvalidData(format!(
                "θ would hold k × D = {k} × {d} means, more than the largest supported, {}",
                crate::MAX_DATA_VALUES
            )));
        }
        for (name, v) in [("prior_sd", prior_sd), ("noise_sd", noise_sd)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::InvalidParameter {
                    name,
                    value: v,
                    reason: "must be finite and > 0",
                });
            }
        }
        let w = weights
            .map(<[f64]>::to_vec)
            .unwrap_or_else(|| vec![1.0 / k as f64; k]);
        if w.len() != k {
            return Err(ModelError::InvalidData(format!(
                "weights has {} values for k = {k}",
                w.len()
            )));
        }
        let log_w = check_weights(&w)?;
        if let Some(i) = w.iter().position(|&v| v <= 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "weights",
                value: w[i],
                reason: "must be > 0 for mean-field VI",
            });
        }
        Ok(Self {
            k,
            d,
            prior_sd,
            noise_sd,
            log_w,
        })
    }

    /// The observation noise sd s.
    pub fn noise_sd(&self) -> f64 {
        self.noise_sd
    }

    /// The prior sd σ0 of the means.
    pub fn prior_sd(&self) -> f64 {
        self.prior_sd
    }

    /// The observation dimension D.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The number of components K.
    pub fn components(&self) -> usize {
        self.k
    }

    /// The mixture weights.
    pub fn weights(&self) -> Vec<f64> {
        self.log_w.iter().map(|l| l.exp()).collect()
    }

    /// Simulate N observations (row-major N×D) with a seeded ChaCha8
    /// generator; μ from its prior unless given (K·D values).
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, self.d)?;
        let (k, d) = (self.k, self.d);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mu: Vec<f64> = match theta {
            Some(t) if t.len() == k * d => t.to_vec(),
            Some(t) => {
                return Err(ModelError::InvalidData(format!(
                    "θ has {} values, expected K·D = {}",
                    t.len(),
                    k * d
                )))
            }
            None => (0..k * d)
                .map(|_| {
                    self.prior_sd
                        * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng)
                })
                .collect::<Vec<f64>>(),
        };
        let w = self.weights();
        let u = Uniform::new(0.0, 1.0).map_err(|e| ModelError::InvalidData(e.to_string()))?;
        let mut x = Vec::with_capacity(n * d);
        for _ in 0..n {
            let r: f64 = u.sample(&mut rng);
            let mut acc = 0.0;
            let mut z = k - 1;
            for (j, wj) in w.iter().enumerate() {
                acc += wj;
                if r < acc {
                    z = j;
                    break;
                }
            }
            for j in 0..d {
                let e: f64 = StandardNormal.sample(&mut rng);
                x.push(mu[z * d + j] + self.noise_sd * e);
            }
        }
        Ok(x)
    }
}

impl Model for MixtureModel {
    fn name(&self) -> &'static str {
        "mixture"
    }

    fn theta_dim(&self) -> usize {
        self.k * self.d
    }

    fn local_dim(&self) -> usize {
        self.k
    }

    fn observation_dim(&self) -> usize {
        self.d
    }

    fn local_states(&self) -> Option<usize> {
        Some(self.k)
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        let size = x.size();
        let ok = (self.d == 1 && size.len() == 1) || (size.len() == 2 && size[1] == self.d as i64);
        if !ok {
            return Err(ModelError::InvalidData(format!(
                "the mixture expects observations of dimension {}, got data of shape {size:?}",
                self.d
            )));
        }
        let host = Vec::<f64>::try_from(
            x.to_kind(Kind::Double)
                .to_device(tch::Device::Cpu)
                .view([-1]),
        )?;
        crate::check_finite_data(&host)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(crate::normal_log_prior(theta, self.prior_sd))
    }

    fn log_joint(&self, _theta: &Tensor, _z: &Tensor, _x: &Tensor) -> Result<Tensor> {
        Err(ModelError::InvalidData(
            "the mixture has discrete z: use expected_log_joint".into(),
        ))
    }

    fn expected_log_joint(&self, theta: &Tensor, log_probs: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (k, d) = (self.k as i64, self.d as i64);
        let m = theta.size()[0];
        let x = x.view([-1, d]);
        let n = x.size()[0];
        if log_probs.size() != [n, k] || theta.size() != [m, k * d] {
            return Err(ModelError::Shape {
                what: "theta / log_probs",
                expected: format!("[M, {}] and [{n}, {k}]", k * d),
                got: [theta.size(), log_probs.size()].concat(),
            });
        }
        let kind = theta.kind();
        let q = log_probs.exp(); // [N, K]
        let nk = q.sum_dim_intlist(0, false, kind); // [K]
        let sx = q.transpose(0, 1).matmul(&x); // [K, D]
        let mu = theta.view([m, k, d]);
        let mu2 = mu.square().sum_dim_intlist(2, false, kind); // [M, K]
        let cross = (&mu * sx.unsqueeze(0)).sum_dim_intlist([1i64, 2].as_slice(), false, kind); // [M]
        let x2 = x.square().sum(kind);
        let s2 = self.noise_sd * self.noise_sd;
        let quad = (x2 - cross.multiply_scalar(2.0)
            + (&mu2 * nk.unsqueeze(0)).sum_dim_intlist(1, false, kind))
        .divide_scalar(-2.0 * s2);
        let log_w = Tensor::from_slice(&self.log_w)
            .to_kind(kind)
            .to_device(theta.device());
        let lik_const = -(n * d) as f64 * (self.noise_sd.ln() + HALF_LN_2PI);
        let prior = mu2
            .sum_dim_intlist(1, false, kind)
            .divide_scalar(-2.0 * self.prior_sd * self.prior_sd)
            - (k * d) as f64 * (self.prior_sd.ln() + HALF_LN_2PI);
        Ok(quad + (nk * log_w).sum(kind) + lik_const + prior)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixture_reference::log_marginal_given_means;

    /// With q(z_n) the exact posterior given μ, the expected log joint minus
    /// log p(μ) plus the entropy of q equals log p(x | μ) (1e-9 relative,
    /// f64).
    #[test]
    fn exact_posterior_gives_the_marginal_likelihood() {
        let m = MixtureModel::new(3, 2, 4.0, 0.8, Some(&[0.2, 0.3, 0.5])).unwrap();
        let mu = [-3.0, 0.0, 0.0, 3.0, 3.0, 0.0];
        let x = m.simulate(40, 9, Some(&mu)).unwrap();
        let xt = Tensor::from_slice(&x).view([40, 2]);
        let mut_t = Tensor::from_slice(&mu).view([3, 2]);
        // log posterior responsibilities
        let d2 = (xt.unsqueeze(1) - mut_t.unsqueeze(0))
            .square()
            .sum_dim_intlist(2, false, Kind::Double);
        let logits = d2.divide_scalar(-2.0 * 0.64)
            + Tensor::from_slice(&[0.2f64, 0.3, 0.5]).log().unsqueeze(0);
        let lp = logits.log_softmax(1, Kind::Double);
        let theta = Tensor::from_slice(&mu).view([1, 6]);
        let e = m
            .expected_log_joint(&theta, &lp, &xt)
            .unwrap()
            .double_value(&[0]);
        let entropy = -(lp.exp() * &lp).sum(Kind::Double).double_value(&[]);
        let log_prior: f64 = mu
            .iter()
            .map(|v| -0.5 * v * v / 16.0 - 4f64.ln() - HALF_LN_2PI)
            .sum();
        let want = log_marginal_given_means(&x, 2, &mu, 0.8, &[0.2, 0.3, 0.5]).unwrap();
        assert!(
            (e + entropy - log_prior - want).abs() < 1e-9 * want.abs(),
            "{} vs {want}",
            e + entropy - log_prior
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(MixtureModel::new(0, 1, 1.0, 1.0, None).is_err());
        assert!(MixtureModel::new(2, 1, 0.0, 1.0, None).is_err());
        assert!(MixtureModel::new(2, 1, 1.0, 1.0, Some(&[0.5, 0.6])).is_err());
        assert!(MixtureModel::new(2, 1, 1.0, 1.0, Some(&[1.0, 0.0])).is_err());
    }
}
