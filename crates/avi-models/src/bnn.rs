//! The Bayesian neural network / Bayesian VAE decoder of the paper (Eq. 16,
//! digest §3.3, §4.4, §7 rows 7–8b).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Kind, Tensor};

use crate::{ModelError, Result, HALF_LN_2PI};

/// The largest latent, hidden or pixel width [`BnnModel::new`] accepts.
pub const MAX_WIDTH: usize = 1 << 16;

/// Bayesian neural network model (Eq. 16), by default with the paper's unit
/// variances (σ = 1):
///
/// ```text
/// θ = (W1, W2, W3, b1, b2, b3) ~ N(0, I)            (P numbers)
/// z_n ~ N(0, I_latent)                              n = 1..N
/// x_n | z_n, θ ~ N(Ω(z_n; θ), σ² I_pixels)
/// Ω(z) = W3 h2 + b3,  h2 = LeakyReLU_0.2(W2 h1 + b2),  h1 = LeakyReLU_0.2(W1 z + b1)
/// ```
///
/// The paper's decoder is 64 → 256 → 256 → 784 (P = 283,920; the paper's
/// printed 57,232 belongs to a smaller net, digest §7 row 7). θ is flattened
/// in the authors' order: W1 (hidden×latent), W2 (hidden×hidden),
/// W3 (pixels×hidden), each row-major (out, in), then b1, b2, b3. The
/// authors' code drops the ½ factors of the likelihood and prior (variances
/// ½); this follows the paper (unit variances), all constants included.
/// [`BnnModel::with_noise_sd`] sets another pixel sd σ (σ = √½ is the
/// likelihood scale of the authors' code). The output layer is linear (no
/// sigmoid).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnnModel {
    latent: usize,
    hidden: usize,
    pixels: usize,
    noise_sd: f64,
}

impl Default for BnnModel {
    fn default() -> Self {
        Self {
            latent: 64,
            hidden: 256,
            pixels: 784,
            noise_sd: 1.0,
        }
    }
}

impl BnnModel {
    /// A decoder latent → hidden → hidden → pixels (all ≥ 1).
    pub fn new(latent: usize, hidden: usize, pixels: usize) -> Result<Self> {
        for (name, v) in [("latent", latent), ("hidden", hidden), ("pixels", pixels)] {
            if v == 0 {
                return Err(ModelError::InvalidParameter {
                    name,
                    value: 0.0,
                    reason: "must be at least 1",
                });
            }
            if v > MAX_WIDTH {
                return Err(ModelError::InvalidParameter {
                    name,
                    value: v as f64,
                    reason: "is wider than supported (at most 65,536)",
                });
            }
        }
        // θ: latent → hidden → hidden → pixels weights and biases; each
        // width is at most 2^16, so this cannot overflow.
        let theta = (latent + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * pixels;
        if theta > crate::MAX_DATA_VALUES {
            return Err(ModelError::InvalidData(format!(
                "the decoder would have {theta} weights and biases, more than the largest supported, {}",
                crate::MAX_DATA_VALUES
            )));
        }
        Ok(Self {
            latent,
            hidden,
            pixels,
            noise_sd: 1.0,
        })
    }

    /// The same decoder with pixel noise sd σ (finite, > 0; default 1, the
    /// paper's).
    pub fn with_noise_sd(self, noise_sd: f64) -> Result<Self> {
        if !(noise_sd.is_finite() && noise_sd > 0.0) {
            return Err(ModelError::InvalidParameter {
                name: "noise_sd",
                value: noise_sd,
                reason: "must be finite and > 0",
            });
        }
        Ok(Self { noise_sd, ..self })
    }

    /// The pixel noise sd σ.
    pub fn noise_sd(&self) -> f64 {
        self.noise_sd
    }

    /// The dimension of one observation.
    pub fn pixels(&self) -> usize {
        self.pixels
    }

    fn blocks(&self) -> [(usize, usize); 3] {
        [
            (self.hidden, self.latent),
            (self.hidden, self.hidden),
            (self.pixels, self.hidden),
        ]
    }

    /// Ω(z; θ) for each draw: `theta` `[M, P]`, `z` `[M, B, latent]` →
    /// `[M, B, pixels]`.
    pub fn decode(&self, theta: &Tensor, z: &Tensor) -> Tensor {
        let m = theta.size()[0];
        let mut offset = 0i64;
        let mut take = |rows: usize, cols: usize| {
            let len = (rows * cols) as i64;
            let t = theta
                .narrow(1, offset, len)
                .view([m, rows as i64, cols as i64]);
            offset += len;
            t
        };
        let [(h1, l), (h2, _), (p, _)] = self.blocks();
        let w1 = take(h1, l);
        let w2 = take(h2, h1);
        let w3 = take(p, h2);
        let b1 = take(1, h1);
        let b2 = take(1, h2);
        let b3 = take(1, p);
        let leaky = |u: Tensor| u.maximum(&u.multiply_scalar(0.2));
        let a1 = leaky(z.matmul(&w1.transpose(1, 2)) + b1);
        let a2 = leaky(a1.matmul(&w2.transpose(1, 2)) + b2);
        a2.matmul(&w3.transpose(1, 2)) + b3
    }

    /// Reconstruction mean squared error over pixels and images at point
    /// values (the paper's metric at the Bayes estimators, digest §4.4):
    /// `mean((Ω(z; θ) − x)²)` with `theta` `[P]`, `z` `[N, latent]` and `x`
    /// `[N, pixels]`, computed without gradients in chunks of 1,000 images.
    pub fn reconstruction_mse(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<f64> {
        let n = x.size()[0];
        if theta.size() != [crate::Model::theta_dim(self) as i64]
            || z.size() != [n, self.latent as i64]
            || x.size() != [n, self.pixels as i64]
            || n == 0
        {
            return Err(ModelError::Shape {
                what: "reconstruction_mse (θ, z, x)",
                expected: format!(
                    "[{}], [N, {}], [N, {}] with N ≥ 1",
                    crate::Model::theta_dim(self),
                    self.latent,
                    self.pixels
                ),
                got: [theta.size(), z.size(), x.size()].concat(),
            });
        }
        let _guard = tch::no_grad_guard();
        let theta = theta.unsqueeze(0);
        let mut total = 0.0;
        let mut start = 0;
        while start < n {
            let len = (n - start).min(1000);
            let rec = self.decode(&theta, &z.narrow(0, start, len).unsqueeze(0));
            let diff = rec.squeeze_dim(0) - x.narrow(0, start, len);
            total += diff.square().sum(Kind::Double).double_value(&[]);
            start += len;
        }
        Ok(total / (n * self.pixels as i64) as f64)
    }

    /// Simulate N observations (row-major N×pixels) with a seeded ChaCha8
    /// generator: θ from its prior unless given, z ~ N(0, I), x = Ω(z) + ε.
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, self.pixels.saturating_add(self.latent))?;
        let p = crate::Model::theta_dim(self);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |k: usize| -> Vec<f64> {
            (0..k)
                .map(|_| <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng))
                .collect()
        };
        let theta = match theta {
            Some(t) if t.len() == p => t.to_vec(),
            Some(t) => {
                return Err(ModelError::InvalidData(format!(
                    "θ has {} values, expected {p}",
                    t.len()
                )))
            }
            None => normal(p),
        };
        let z = normal(n * self.latent);
        let eps = normal(n * self.pixels);
        let mean = self.decode(
            &Tensor::from_slice(&theta).view([1, p as i64]),
            &Tensor::from_slice(&z).view([1, n as i64, self.latent as i64]),
        );
        let mean = Vec::<f64>::try_from(mean.view([-1]))?;
        Ok(mean
            .iter()
            .zip(&eps)
            .map(|(m, e)| m + self.noise_sd * e)
            .collect())
    }

    fn log_lik(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Tensor {
        let kind = theta.kind();
        let resid = x.unsqueeze(0) - self.decode(theta, z);
        let count = (x.size()[0] * self.pixels as i64) as f64;
        resid
            .square()
            .sum_dim_intlist([1i64, 2].as_slice(), false, kind)
            .multiply_scalar(-0.5 / (self.noise_sd * self.noise_sd))
            - count * (HALF_LN_2PI + self.noise_sd.ln())
    }

    fn log_prior_z(&self, z: &Tensor) -> Tensor {
        let count = (z.size()[1] * z.size()[2]) as f64;
        z.square()
            .sum_dim_intlist([1i64, 2].as_slice(), false, z.kind())
            .multiply_scalar(-0.5)
            - count * HALF_LN_2PI
    }
}

impl crate::Model for BnnModel {
    fn name(&self) -> &'static str {
        "bnn"
    }

    fn theta_dim(&self) -> usize {
        self.blocks().iter().map(|(o, i)| o * i + o).sum()
    }

    fn local_dim(&self) -> usize {
        self.latent
    }

    fn observation_dim(&self) -> usize {
        self.pixels
    }

    fn work_per_observation(&self) -> usize {
        // The decoder's layers per draw and image: z, two hidden layers
        // (before and after the activation) and the pixel means.
        self.latent
            .saturating_add(self.hidden.saturating_mul(4))
            .saturating_add(self.pixels)
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        let size = x.size();
        if size.len() != 2 || size[1] != self.pixels as i64 || size[0] == 0 {
            return Err(ModelError::InvalidData(format!(
                "the bnn model takes N observations of {} values, got shape {size:?}",
                self.pixels
            )));
        }
        let finite = x.isfinite().all().int64_value(&[]) == 1;
        if !finite {
            return Err(ModelError::InvalidData(
                "the data have non-finite values".into(),
            ));
        }
        Ok(())
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(crate::normal_log_prior(theta, 1.0))
    }

    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        crate::check_draw_shapes(theta, z, x, crate::Model::theta_dim(self), self.latent)?;
        Ok(crate::normal_log_prior(theta, 1.0) + self.log_prior_z(z) + self.log_lik(theta, z, x))
    }

    fn has_local_terms(&self) -> bool {
        true
    }

    fn local_terms(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        crate::check_draw_shapes(theta, z, x, crate::Model::theta_dim(self), self.latent)?;
        let kind = theta.kind();
        // log N(z_n; 0, I) + log N(x_n; Ω(z_n; θ), σ² I), each summed over
        // its own dimension only.
        let prior_z = z
            .square()
            .sum_dim_intlist(2, false, kind)
            .multiply_scalar(-0.5)
            - self.latent as f64 * HALF_LN_2PI;
        let resid = x.unsqueeze(0) - self.decode(theta, z);
        let lik = resid
            .square()
            .sum_dim_intlist(2, false, kind)
            .multiply_scalar(-0.5 / (self.noise_sd * self.noise_sd))
            - self.pixels as f64 * (HALF_LN_2PI + self.noise_sd.ln());
        Ok(prior_z + lik)
    }

    fn supports_batches(&self) -> bool {
        true
    }

    fn log_joint_batch(
        &self,
        theta: &Tensor,
        z: &Tensor,
        x: &Tensor,
        batch: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        crate::check_draw_shapes(theta, z, x, crate::Model::theta_dim(self), self.latent)?;
        let zb = z.index_select(1, batch);
        let xb = x.index_select(0, batch);
        Ok(crate::normal_log_prior(theta, 1.0)
            + self.log_prior_z(z)
            + self.log_lik(theta, &zb, &xb).multiply_scalar(scale))
    }
}

#[cfg(test)]
mod tests {
    /// The per-observation terms add up to the log joint (f64, 1e-12
    /// relative: the same terms summed in another order).
    #[test]
    fn local_terms_sum_to_log_joint() {
        let m = BnnModel::new(3, 5, 7).unwrap().with_noise_sd(0.7).unwrap();
        let opts = (Kind::Double, tch::Device::Cpu);
        let theta = Tensor::randn([2, m.theta_dim() as i64], opts);
        let z = Tensor::randn([2, 11, 3], opts);
        let x = Tensor::randn([11, 7], opts);
        let err = crate::test_util::local_terms_error(&m, &theta, &z, &x);
        assert!(err < 1e-12, "{err}");
    }

    use super::*;
    use crate::Model;

    #[test]
    fn paper_decoder_has_283920_parameters() {
        assert_eq!(BnnModel::default().theta_dim(), 283_920);
    }

    /// The decoder against a hand computation on a 1 → 2 → 2 → 1 net, and the
    /// log joint against its formula (f64, 1e-12).
    #[test]
    fn decoder_and_log_joint_by_hand() {
        let m = BnnModel::new(1, 2, 1).unwrap();
        // W1 = [1, -1]ᵀ, W2 = [[1, 0], [2, 1]], W3 = [1, -1], b1 = [0, 0.5], b2 = [0, 0], b3 = [0.1]
        let theta = [
            1.0, -1.0, 1.0, 0.0, 2.0, 1.0, 1.0, -1.0, 0.0, 0.5, 0.0, 0.0, 0.1,
        ];
        assert_eq!(m.theta_dim(), theta.len());
        let z = 2.0;
        let lr = |u: f64| if u > 0.0 { u } else { 0.2 * u };
        let h1 = [lr(z), lr(-z + 0.5)];
        let h2 = [lr(h1[0]), lr(2.0 * h1[0] + h1[1])];
        let out = h2[0] - h2[1] + 0.1;
        let t = Tensor::from_slice(&theta).view([1, 13]);
        let zt = Tensor::from_slice(&[z]).view([1, 1, 1]);
        let got = m.decode(&t, &zt).double_value(&[0, 0, 0]);
        assert!((got - out).abs() < 1e-12);
        let x = 0.3;
        let lj = m
            .log_joint(&t, &zt, &Tensor::from_slice(&[x]).view([1, 1]))
            .unwrap()
            .double_value(&[0]);
        let prior: f64 = theta.iter().map(|v| -0.5 * v * v - HALF_LN_2PI).sum();
        let want = prior - 0.5 * z * z - HALF_LN_2PI - 0.5 * (x - out).powi(2) - HALF_LN_2PI;
        assert!((lj - want).abs() < 1e-12 * want.abs());
        // Pixel sd σ = 0.3: the likelihood term becomes log N(x; Ω, σ²).
        let sigma = 0.3;
        let ms = m.with_noise_sd(sigma).unwrap();
        let lj = ms
            .log_joint(&t, &zt, &Tensor::from_slice(&[x]).view([1, 1]))
            .unwrap()
            .double_value(&[0]);
        let want = prior
            - 0.5 * z * z
            - HALF_LN_2PI
            - 0.5 * ((x - out) / sigma).powi(2)
            - HALF_LN_2PI
            - sigma.ln();
        assert!((lj - want).abs() < 1e-12 * want.abs());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(m.with_noise_sd(bad).is_err(), "σ = {bad} accepted");
        }
    }

    /// With the whole data set as the batch and scale 1, the batched log joint
    /// is the full one (1e-12 relative, f64).
    #[test]
    fn full_batch_is_the_log_joint() {
        let m = BnnModel::new(3, 4, 5).unwrap();
        let x = Tensor::from_slice(&m.simulate(6, 1, None).unwrap()).view([6, 5]);
        tch::manual_seed(0);
        let theta = Tensor::randn([2, m.theta_dim() as i64], (Kind::Double, tch::Device::Cpu));
        let z = Tensor::randn([2, 6, 3], (Kind::Double, tch::Device::Cpu));
        let all = Tensor::arange(6, (Kind::Int64, tch::Device::Cpu));
        let a = m.log_joint(&theta, &z, &x).unwrap();
        let b = m.log_joint_batch(&theta, &z, &x, &all, 1.0).unwrap();
        let diff = (&a - &b).abs().max().double_value(&[]);
        assert!(diff < 1e-12 * a.abs().max().double_value(&[]));
    }

    /// The MSE against a direct computation on a small random net (f64,
    /// 1e-12: the same decoder, summed in another order).
    #[test]
    fn reconstruction_mse_is_the_mean_squared_residual() {
        let m = BnnModel::new(2, 3, 4).unwrap();
        tch::manual_seed(5);
        let theta = Tensor::randn([m.theta_dim() as i64], (Kind::Double, tch::Device::Cpu));
        let z = Tensor::randn([2500, 2], (Kind::Double, tch::Device::Cpu));
        let x = Tensor::rand([2500, 4], (Kind::Double, tch::Device::Cpu));
        let direct = (m
            .decode(&theta.unsqueeze(0), &z.unsqueeze(0))
            .squeeze_dim(0)
            - &x)
            .square()
            .mean(Kind::Double)
            .double_value(&[]);
        let got = m.reconstruction_mse(&theta, &z, &x).unwrap();
        assert!((got - direct).abs() < 1e-12, "{got} vs {direct}");
        assert!(m
            .reconstruction_mse(&theta, &z, &x.narrow(0, 0, 10))
            .is_err());
    }
}
