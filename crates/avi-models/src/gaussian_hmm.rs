//! The Gaussian hidden Markov model of Prop. 3.8, corrected (digest §3.3,
//! §3.5, §7 row 15).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::Tensor;

use crate::gaussian::{ArrowTridiagonal, GaussianReference};
use crate::saw::{gaussian_exact_elbo, gaussian_reference};
use crate::{
    check_draw_shapes, check_finite_data, check_scalar_tensor, Model, ModelError, Result,
    HALF_LN_2PI,
};

/// A Gaussian HMM (an AR(1) latent chain observed in noise, with a global
/// offset θ):
///
/// ```text
/// θ ~ N(0, 1)
/// z_1 ~ N(0, s0²)
/// z_n | z_{n−1} ~ N(ρ z_{n−1}, q²)       n = 2..N
/// x_n | z_n, θ ~ N(θ + z_n, r²)
/// ```
///
/// θ and z_n are scalars. The initial prior is proper (s0 > 0): the paper's
/// App. A.5 uses a flat p(z_0) and an indefinite precision matrix, whose
/// Fig. 8 is wrong; with a flat prior and x ≡ 1 the F-VI means are constant
/// and prove nothing (digest §3.3). With a proper p(z_1) the F-VI optimum
/// `ν_n*` depends on every observation and on n, so no inference function on
/// a strict window of the data is ideal (Prop. 3.8). The posterior is
/// Gaussian with tridiagonal-plus-arrow precision, so the F-VI optimum is
/// exact in O(N) ([`GaussianHmm::fvi_optimum`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianHmm {
    rho: f64,
    q: f64,
    r: f64,
    s0: f64,
}

impl GaussianHmm {
    /// A Gaussian HMM with autoregression `rho` (finite), transition sd `q`,
    /// emission sd `r` and initial sd `s0` (all finite and > 0).
    pub fn new(rho: f64, q: f64, r: f64, s0: f64) -> Result<Self> {
        if !rho.is_finite() {
            return Err(ModelError::InvalidParameter {
                name: "rho",
                value: rho,
                reason: "must be finite",
            });
        }
        for (name, v) in [("q", q), ("r", r), ("s0", s0)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::InvalidParameter {
                    name,
                    value: v,
                    reason: "must be finite and > 0",
                });
            }
        }
        Ok(Self { rho, q, r, s0 })
    }

    /// Simulate x_1..x_N with a seeded ChaCha8 generator; θ ~ N(0, 1) unless
    /// given.
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<f64>) -> Result<Vec<f64>> {
        crate::check_sample_size(n, 1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let theta = theta.unwrap_or_else(|| StandardNormal.sample(&mut rng));
        let mut z = 0.0;
        Ok((0..n)
            .map(|i| {
                let e: f64 = StandardNormal.sample(&mut rng);
                z = if i == 0 {
                    self.s0 * e
                } else {
                    self.rho * z + self.q * e
                };
                let eps: f64 = StandardNormal.sample(&mut rng);
                theta + z + self.r * eps
            })
            .collect())
    }

    /// `log p(θ, z, x)` in f64 on the host (independent evaluation).
    pub fn log_joint_f64(&self, theta: f64, z: &[f64], x: &[f64]) -> f64 {
        let norm = |v: f64, sd: f64| -0.5 * (v / sd).powi(2) - sd.ln() - HALF_LN_2PI;
        let mut lp = norm(theta, 1.0);
        for i in 0..z.len() {
            lp += if i == 0 {
                norm(z[0], self.s0)
            } else {
                norm(z[i] - self.rho * z[i - 1], self.q)
            };
            lp += norm(x[i] - theta - z[i], self.r);
        }
        lp
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

    /// The posterior precision and `Φ μ = b` right-hand side.
    fn precision(&self, x: &[f64]) -> (ArrowTridiagonal, f64, Vec<f64>) {
        let n = x.len();
        let (iq2, ir2) = (self.q.powi(-2), self.r.powi(-2));
        let rho2 = self.rho * self.rho;
        let t = (0..n)
            .map(|i| {
                let prior = if i == 0 { self.s0.powi(-2) } else { iq2 };
                let next = if i + 1 < n { rho2 * iq2 } else { 0.0 };
                prior + next + ir2
            })
            .collect();
        let phi = ArrowTridiagonal {
            a: 1.0 + n as f64 * ir2,
            c: vec![ir2; n],
            t,
            e: vec![-self.rho * iq2; n.saturating_sub(1)],
        };
        let b_theta = ir2 * x.iter().sum::<f64>();
        let b_z: Vec<f64> = x.iter().map(|v| ir2 * v).collect();
        (phi, b_theta, b_z)
    }

    /// The exact F-VI optimum for data `x` (θ known when `fixed_theta`).
    pub fn fvi_optimum(&self, x: &[f64], fixed_theta: Option<f64>) -> Result<GaussianReference> {
        check_finite_data(x)?;
        let (phi, b_theta, b_z) = self.precision(x);
        gaussian_reference(&phi, b_theta, &b_z, fixed_theta, |th, z| {
            self.log_joint_f64(th, z, x)
        })
    }
}

impl GaussianHmm {
    /// `log p(x | θ)` exactly, by the Kalman filter (O(N), f64): with
    /// predicted mean μ_n and variance P_n of z_n given x_{1..n−1}
    /// (μ_1 = 0, P_1 = s0²; μ_n = ρ μ'_{n−1}, P_n = ρ² P'_{n−1} + q²), the
    /// innovation v_n = x_n − θ − μ_n has variance S_n = P_n + r², and
    /// `log p(x | θ) = Σ_n −½ (log 2π S_n + v_n² / S_n)`; the filtered
    /// moments are μ'_n = μ_n + (P_n / S_n) v_n, P'_n = P_n r² / S_n.
    /// This is the target the ELBO bounds when θ is fixed.
    pub fn log_marginal(&self, x: &[f64], theta: f64) -> Result<f64> {
        check_finite_data(x)?;
        let (rho, q2, r2) = (self.rho, self.q * self.q, self.r * self.r);
        let (mut mean, mut var) = (0.0, self.s0 * self.s0);
        let mut total = 0.0;
        for (i, &xi) in x.iter().enumerate() {
            if i > 0 {
                mean *= rho;
                var = rho * rho * var + q2;
            }
            let s = var + r2;
            let v = xi - theta - mean;
            total -= HALF_LN_2PI + 0.5 * s.ln() + 0.5 * v * v / s;
            mean += var / s * v;
            var = var * r2 / s;
        }
        Ok(total)
    }

    /// The exact posterior p(z | x, θ) as a forward Gauss–Markov chain:
    /// `z_1 = m_1 + s_1 ε_1`, `z_n = a_n z_{n−1} + m_n + s_n ε_n`, returned
    /// as `(a, m, s)` (N values each; `a[0]` is 0, unused). From the
    /// backward information filter: with p(x_{n..N} | z_n) ∝
    /// exp(−½ J_n z_n² + h_n z_n) (emission included),
    /// p(z_n | z_{n−1}, x) has precision P_n = 1/q² + J_n (1/s0² + J_1 for
    /// n = 1), mean (ρ z_{n−1}/q² + h_n)/P_n; and the message to n − 1 is
    /// J_{n−1} = ρ²/q² − ρ²/(q⁴ P_n) + 1/r², h_{n−1} = ρ h_n/(q² P_n) +
    /// (x_{n−1} − θ)/r².
    pub fn posterior_chain(&self, x: &[f64], theta: f64) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        check_finite_data(x)?;
        let n = x.len();
        let (iq2, ir2) = (self.q.powi(-2), self.r.powi(-2));
        let rho = self.rho;
        let (mut a, mut m, mut s) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        // Messages after the last observation: nothing to come.
        let (mut j, mut h) = (0.0, 0.0);
        for i in (0..n).rev() {
            j += ir2;
            h += (x[i] - theta) * ir2;
            let prior = if i == 0 { self.s0.powi(-2) } else { iq2 };
            let precision = prior + j;
            s[i] = precision.sqrt().recip();
            m[i] = h / precision;
            if i > 0 {
                a[i] = rho * iq2 / precision;
            }
            j = rho * rho * iq2 - rho * rho * iq2 * iq2 / precision;
            h = rho * iq2 * h / precision;
        }
        Ok((a, m, s))
    }
}

impl Model for GaussianHmm {
    fn name(&self) -> &'static str {
        "gaussian_hmm"
    }

    fn theta_dim(&self) -> usize {
        1
    }

    fn local_dim(&self) -> usize {
        1
    }

    fn check_data(&self, x: &Tensor) -> Result<()> {
        check_scalar_tensor("gaussian_hmm", x)
    }

    fn log_prior(&self, theta: &Tensor) -> Result<Tensor> {
        Ok(crate::normal_log_prior(theta, 1.0))
    }

    fn log_joint(&self, theta: &Tensor, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_draw_shapes(theta, z, x, 1, 1)?;
        let n = x.size()[0];
        let z = z.squeeze_dim(2); // [M, N]

        // The 1/s0², 1/q², 1/r² scalings are applied to the [M] sums, not
        // to the [M, N] residuals (two fewer passes forward and backward).
        let sum_sq = |t: &Tensor| t.square().sum_dim_intlist(1, false, None);
        let first = z.select(1, 0).square();
        let trans =
            sum_sq(&(z.narrow(1, 1, n - 1) - z.narrow(1, 0, n - 1).multiply_scalar(self.rho)));
        let emit = sum_sq(&((x.unsqueeze(0) - theta) - &z));
        let quad = theta.squeeze_dim(1).square()
            + first.divide_scalar(self.s0 * self.s0)
            + trans.divide_scalar(self.q * self.q)
            + emit.divide_scalar(self.r * self.r);
        let nf = n as f64;
        let constant = (2.0 * nf + 1.0) * HALF_LN_2PI
            + self.s0.ln()
            + (nf - 1.0) * self.q.ln()
            + nf * self.r.ln();
        Ok(quad.multiply_scalar(-0.5) - constant)
    }
}

/// The curve of the paper's Fig. 8, reproduced with its error (digest §3.3):
/// the authors' `hmm_counter_example.R` builds the N × N matrix Ψ with
/// diagonal 3 (Ψ₁₁ = 1) and off-diagonals −2, which is indefinite, and
/// plots `μ = −2 Ψ⁻¹ x` for `x ≡ 1`. The correct F-VI means of the random
/// walk HMM are those of [`GaussianHmm::fvi_optimum`]; this function exists
/// only to show the published curve beside them, labelled as erroneous.
/// Solved by Gaussian elimination with partial pivoting (the matrix is
/// not positive definite).
pub fn paper_fig8_erroneous_means(n: usize) -> Vec<f64> {
    let mut a = vec![vec![0.0; n]; n];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = if i == 0 { 1.0 } else { 3.0 };
        if i > 0 {
            row[i - 1] = -2.0;
        }
        if i + 1 < n {
            row[i + 1] = -2.0;
        }
    }
    dense_solve(a, vec![1.0; n])
        .iter()
        .map(|m| -2.0 * m)
        .collect()
}

/// Solve the dense system `a y = b` by Gaussian elimination with partial
/// pivoting (small systems only).
fn dense_solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (k, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[col + 1 + k] -= f * b[col];
        }
    }
    let mut y = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|j| a[i][j] * y[j]).sum();
        y[i] = (b[i] - s) / a[i][i];
    }
    y
}

impl GaussianHmm {
    /// The best mean-field ELBO (θ fixed at `theta`) over factors that are
    /// equal within each group of indices: `groups[n]` is the group of
    /// z_n. This is the A-VI optimum of an inference function that is free
    /// in every other respect but cannot tell group members apart, e.g. a
    /// window of the data that is identical for them (Prop. 3.8): any
    /// function of such a window gives them one factor. The tied means solve
    /// `(GᵀTG) g = Gᵀ(b − cθ)` and the tied variances are `|g| / Σ_g T_nn`
    /// (the ELBO separates in means and variances); the value is exact.
    pub fn tied_optimum_elbo(&self, x: &[f64], theta: f64, groups: &[usize]) -> Result<f64> {
        check_finite_data(x)?;
        if groups.len() != x.len() {
            return Err(ModelError::InvalidData(format!(
                "{} group labels for {} observations",
                groups.len(),
                x.len()
            )));
        }
        let k = groups.iter().max().map_or(0, |g| g + 1);
        let (phi, _, b_z) = self.precision(x);
        let mut m = vec![vec![0.0; k]; k];
        let mut rhs = vec![0.0; k];
        let mut diag_sum = vec![0.0; k];
        let mut count = vec![0usize; k];
        for (i, &g) in groups.iter().enumerate() {
            m[g][g] += phi.t[i];
            rhs[g] += b_z[i] - phi.c[i] * theta;
            diag_sum[g] += phi.t[i];
            count[g] += 1;
            if i + 1 < groups.len() {
                let h = groups[i + 1];
                m[g][h] += phi.e[i];
                m[h][g] += phi.e[i];
            }
        }
        if count.contains(&0) {
            return Err(ModelError::InvalidData(
                "group labels must be 0..K−1 with every group used".into(),
            ));
        }
        let g = dense_solve(m, rhs);
        let mean: Vec<f64> = groups.iter().map(|&j| g[j]).collect();
        let sd: Vec<f64> = groups
            .iter()
            .map(|&j| (count[j] as f64 / diag_sum[j]).sqrt())
            .collect();
        self.exact_elbo(x, None, Some(theta), &mean, &sd)
    }
}

/// Group the indices of a scalar series by the content of their windows
/// `x_{n−before} … x_{n+after}` (padded with `pad` beyond the ends): indices
/// with identical windows share a group, numbered in order of appearance.
pub fn window_groups(x: &[f64], window: [usize; 2], pad: f64) -> Vec<usize> {
    let n = x.len() as i64;
    let [before, after] = [window[0] as i64, window[1] as i64];
    let mut seen: Vec<Vec<u64>> = Vec::new();
    (0..n)
        .map(|i| {
            let key: Vec<u64> = (i - before..=i + after)
                .map(|j| {
                    if (0..n).contains(&j) {
                        x[j as usize].to_bits()
                    } else {
                        pad.to_bits()
                    }
                })
                .collect();
            match seen.iter().position(|s| *s == key) {
                Some(g) => g,
                None => {
                    seen.push(key);
                    seen.len() - 1
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::compare;

    /// The direct formula, term by term.
    fn direct(m: &GaussianHmm, theta: &Tensor, z: &Tensor, x: &Tensor) -> Tensor {
        let n = x.size()[0];
        let z = z.squeeze_dim(2);
        let first = z
            .narrow(1, 0, 1)
            .squeeze_dim(1)
            .divide_scalar(m.s0)
            .square();
        let trans = (z.narrow(1, 1, n - 1) - z.narrow(1, 0, n - 1).multiply_scalar(m.rho))
            .divide_scalar(m.q)
            .square()
            .sum_dim_intlist(1, false, None);
        let emit = ((x.unsqueeze(0) - theta - &z).divide_scalar(m.r))
            .square()
            .sum_dim_intlist(1, false, None);
        let quad = theta.squeeze_dim(1).square() + first + trans + emit;
        let nf = n as f64;
        quad.multiply_scalar(-0.5)
            - ((2.0 * nf + 1.0) * HALF_LN_2PI + m.s0.ln() + (nf - 1.0) * m.q.ln() + nf * m.r.ln())
    }

    /// `log_joint` and its gradients equal the direct formula in f64 (1e-10
    /// relative).
    #[test]
    fn log_joint_matches_direct_formula_f64() {
        let m = GaussianHmm::new(0.9, 0.5, 0.7, 1.0).unwrap();
        let x = Tensor::from_slice(&m.simulate(300, 4, None).unwrap());
        let theta = Tensor::from_slice(&[0.7f64, -1.2, 3.0]).view([3, 1]);
        let z = Tensor::randn([3, 300, 1], (tch::Kind::Double, tch::Device::Cpu));
        let errs = compare(&m, |t, z, x| direct(&m, t, z, x), &theta, &z, &x);
        assert!(errs.iter().all(|e| *e < 1e-10), "{errs:?}");
    }

    /// Tensor log joint vs f64 host evaluation (1e-9 relative).
    #[test]
    fn tensor_log_joint_matches_f64() {
        let m = GaussianHmm::new(0.8, 0.5, 0.7, 1.3).unwrap();
        let x = m.simulate(25, 4, None).unwrap();
        let z: Vec<f64> = (0..25).map(|i| (i as f64 * 0.3).sin()).collect();
        let want = m.log_joint_f64(-0.2, &z, &x);
        let got = m
            .log_joint(
                &Tensor::from_slice(&[-0.2f64]).view([1, 1]),
                &Tensor::from_slice(&z).view([1, 25, 1]),
                &Tensor::from_slice(&x),
            )
            .unwrap()
            .double_value(&[0]);
        assert!((got - want).abs() < 1e-9 * want.abs());
    }

    /// The corrected App. A.5 example: ρ = 1, q = r = 1, θ fixed at 0, x ≡ 1,
    /// with a proper p(z_1) = N(0, 1): the optimal means are not constant
    /// (they rise from the prior mean 0 toward 1), so windows of x cannot
    /// determine them. Checked against a dense solve (1e-10).
    #[test]
    fn counterexample_means_are_not_constant() {
        let m = GaussianHmm::new(1.0, 1.0, 1.0, 1.0).unwrap();
        let x = vec![1.0; 100];
        let r = m.fvi_optimum(&x, Some(0.0)).unwrap();
        let spread = r.z_mean.iter().cloned().fold(f64::MIN, f64::max)
            - r.z_mean.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 0.3, "spread {spread}");
        assert!(r.z_mean[0] < r.z_mean[50]);
        // Dense check of the first 100-dim system: Ψ μ = x with Ψ tridiagonal.
        let n = 100;
        let mut dense = vec![0.0; n * n];
        for i in 0..n {
            dense[i * n + i] = if i + 1 < n { 3.0 } else { 2.0 };
            if i + 1 < n {
                dense[i * n + i + 1] = -1.0;
                dense[(i + 1) * n + i] = -1.0;
            }
        }
        let a = Tensor::from_slice(&dense).view([n as i64, n as i64]);
        let mu = Vec::<f64>::try_from(
            Tensor::linalg_solve(&a, &Tensor::from_slice(&x).view([n as i64, 1]), true).view([-1]),
        )
        .unwrap();
        for (m, z) in mu.iter().zip(&r.z_mean) {
            assert!((m - z).abs() < 1e-10);
        }
    }

    /// A dense multivariate normal log-density of x ~ N(θ 1, Σ_z + r² I)
    /// (Cholesky), Σ_z from the AR(1) recursion. Indexed loops: the
    /// textbook form of the factorisation, kept readable.
    #[allow(clippy::needless_range_loop)]
    fn dense_log_marginal(m: &GaussianHmm, x: &[f64], theta: f64) -> f64 {
        let n = x.len();
        let mut var = vec![0.0; n];
        for i in 0..n {
            var[i] = if i == 0 {
                m.s0 * m.s0
            } else {
                m.rho * m.rho * var[i - 1] + m.q * m.q
            };
        }
        let mut c = vec![vec![0.0; n]; n];
        for i in 0..n {
            for j in i..n {
                let v = m.rho.powi((j - i) as i32) * var[i];
                c[i][j] = v;
                c[j][i] = v;
            }
            c[i][i] += m.r * m.r;
        }
        // Cholesky c = L Lᵀ, in place in the lower triangle.
        for j in 0..n {
            let d = c[j][j] - (0..j).map(|k| c[j][k] * c[j][k]).sum::<f64>();
            c[j][j] = d.sqrt();
            for i in j + 1..n {
                let v = c[i][j] - (0..j).map(|k| c[i][k] * c[j][k]).sum::<f64>();
                c[i][j] = v / c[j][j];
            }
        }
        let mut y = vec![0.0; n];
        for i in 0..n {
            let v = x[i] - theta - (0..i).map(|k| c[i][k] * y[k]).sum::<f64>();
            y[i] = v / c[i][i];
        }
        let log_det: f64 = (0..n).map(|i| c[i][i].ln()).sum();
        -(n as f64) * HALF_LN_2PI - log_det - 0.5 * y.iter().map(|v| v * v).sum::<f64>()
    }

    /// The Kalman filter equals the dense Gaussian log-density for N = 5..30
    /// (1e-9 relative: both are O(N) or O(N³) f64 sums of well-conditioned
    /// terms; rounding is ~1e-13).
    #[test]
    fn log_marginal_matches_dense_density() {
        for (k, m) in [
            GaussianHmm::new(0.9, 1.0, 1.0, 1.0).unwrap(),
            GaussianHmm::new(-0.5, 0.3, 2.0, 1.7).unwrap(),
            GaussianHmm::new(1.0, 0.7, 0.4, 2.5).unwrap(),
        ]
        .iter()
        .enumerate()
        {
            for n in [5, 12, 30] {
                let x = m.simulate(n, 40 + k as u64, Some(0.3)).unwrap();
                for theta in [0.3, -1.2] {
                    let got = m.log_marginal(&x, theta).unwrap();
                    let want = dense_log_marginal(m, &x, theta);
                    assert!(
                        (got - want).abs() <= 1e-9 * want.abs(),
                        "{m:?} n={n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The exact posterior chain makes log p(θ, z, x) − log q(z) constant
    /// (= log p(x, θ)) at any z: checked at a few arbitrary z (1e-9
    /// relative), which pins down every (a_n, m_n, s_n).
    #[test]
    fn posterior_chain_is_the_posterior() {
        let m = GaussianHmm::new(0.8, 0.6, 0.9, 1.4).unwrap();
        let x = m.simulate(25, 7, Some(0.5)).unwrap();
        let theta = 0.5;
        let (a, mu, s) = m.posterior_chain(&x, theta).unwrap();
        let log_p_x = m.log_marginal(&x, theta).unwrap();
        let log_prior = -0.5 * theta * theta - HALF_LN_2PI;
        for k in 0..4 {
            let z: Vec<f64> = (0..x.len())
                .map(|i| ((i * 7 + k * 3) as f64 * 0.37).sin() * (1.0 + k as f64))
                .collect();
            let mut log_q = 0.0;
            for i in 0..z.len() {
                let mean = mu[i] + if i > 0 { a[i] * z[i - 1] } else { 0.0 };
                let e = (z[i] - mean) / s[i];
                log_q += -0.5 * e * e - s[i].ln() - HALF_LN_2PI;
            }
            let got = m.log_joint_f64(theta, &z, &x) - log_prior - log_q;
            assert!(
                (got - log_p_x).abs() <= 1e-9 * log_p_x.abs(),
                "{got} vs {log_p_x}"
            );
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(GaussianHmm::new(0.5, 0.0, 1.0, 1.0).is_err());
        assert!(GaussianHmm::new(0.5, 1.0, -1.0, 1.0).is_err());
        assert!(GaussianHmm::new(f64::NAN, 1.0, 1.0, 1.0).is_err());
    }

    /// Fig. 8: the published (erroneous) curve is what the digest's numpy
    /// reproduction gives (values printed to 2 decimals there, so 0.005),
    /// and the corrected means with p(z_1) = N(0, 1) are 0.618, 0.854, 0.944,
    /// 0.979, 0.992 (3 decimals there, so 0.0005), tending to 1 with ratio
    /// ≈ 0.382 (2 decimals: 0.005).
    #[test]
    fn fig8_erroneous_and_corrected_curves() {
        let wrong = paper_fig8_erroneous_means(100);
        for (got, want) in wrong.iter().zip([4.01, 3.01, 1.50, 0.24, -0.14, 0.55]) {
            assert!((got - want).abs() < 0.005, "{got} vs {want}");
        }
        let lo = wrong.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = wrong.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (lo + 0.15).abs() < 0.005 && (hi - 4.15).abs() < 0.005,
            "{lo} {hi}"
        );

        let m = GaussianHmm::new(1.0, 1.0, 1.0, 1.0).unwrap();
        let r = m.fvi_optimum(&[1.0; 100], Some(0.0)).unwrap();
        for (got, want) in r.z_mean.iter().zip([0.618, 0.854, 0.944, 0.979, 0.992]) {
            assert!((got - want).abs() < 0.0005, "{got} vs {want}");
        }
        let ratio = (1.0 - r.z_mean[6]) / (1.0 - r.z_mean[5]);
        assert!((ratio - 0.382).abs() < 0.005, "{ratio}");
        // Not constant: indices with identical windows get different means.
        assert!(r.z_mean[10] - r.z_mean[5] > 1e-3);
    }

    /// The tied optimum: with every index in its own group it is the F-VI
    /// optimum (1e-9 relative); with x ≡ 1 and windows of half-width w the
    /// best possible inference function stays strictly below it, by less
    /// as w grows (Prop. 3.8 made exact).
    #[test]
    fn tied_optimum_bounds_every_window_function() {
        let m = GaussianHmm::new(1.0, 1.0, 1.0, 1.0).unwrap();
        let x = [1.0; 100];
        let opt = m.fvi_optimum(&x, Some(0.0)).unwrap().elbo;
        let own: Vec<usize> = (0..100).collect();
        let free = m.tied_optimum_elbo(&x, 0.0, &own).unwrap();
        assert!((free - opt).abs() <= 1e-9 * opt.abs(), "{free} vs {opt}");
        let mut last = f64::INFINITY;
        for w in [0, 1, 2, 4] {
            let groups = window_groups(&x, [w, w], 0.0);
            let gap = opt - m.tied_optimum_elbo(&x, 0.0, &groups).unwrap();
            assert!(
                gap > 0.0 && gap < last,
                "w = {w}: gap {gap}, previous {last}"
            );
            last = gap;
        }
        // A one-group tying is Const: far worse.
        let one = m.tied_optimum_elbo(&x, 0.0, &[0; 100]).unwrap();
        assert!(opt - one > opt - (opt - last));
        assert!(m.tied_optimum_elbo(&x, 0.0, &[0; 99]).is_err());
    }
}
