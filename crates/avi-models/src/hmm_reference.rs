//! Exact and mean-field inference in a discrete hidden Markov model with
//! Gaussian emissions, in plain f64 on the host.
//!
//! The model has K hidden states, parameters θ = (π, A, μ, s) and N scalar
//! observations:
//!
//! ```text
//! z_1 ~ Cat(π),   z_n | z_{n−1} ~ Cat(A_{z_{n−1}, ·}),   x_n | z_n ~ N(μ_{z_n}, s²)
//! log p(x, z | θ) = log π_{z_1} + Σ_{n≥2} log A_{z_{n−1} z_n} + Σ_n log N(x_n; μ_{z_n}, s²)
//! ```
//!
//! with `log N(x; μ, s²) = −½ log 2π − log s − (x − μ)² / (2 s²)` (all
//! normalising constants included).
//!
//! [`forward_backward`] computes the exact posterior with the forward–backward
//! recursions in log space,
//!
//! ```text
//! log α_1(k) = log π_k + log N(x_1; μ_k, s²)
//! log α_n(j) = LSE_i [log α_{n−1}(i) + log A_ij] + log N(x_n; μ_j, s²)
//! log β_N(i) = 0
//! log β_n(i) = LSE_j [log A_ij + log N(x_{n+1}; μ_j, s²) + log β_{n+1}(j)]
//! log p(x | θ) = LSE_k log α_N(k)
//! p(z_n = k | x) ∝ α_n(k) β_n(k)
//! p(z_{n−1} = i, z_n = j | x) ∝ α_{n−1}(i) A_ij N(x_n; μ_j, s²) β_n(j)
//! ```
//!
//! where LSE is log-sum-exp, so nothing underflows however long the sequence.
//!
//! [`mean_field_cavi`] runs coordinate ascent variational inference (CAVI) for
//! the fully factorised family q(z) = ∏_n q_n(z_n) with θ fixed. The optimal
//! update of one factor given the others is
//!
//! ```text
//! q_n(k) ∝ exp{ [n = 1] log π_k + Σ_i q_{n−1}(i) log A_ik + Σ_j q_{n+1}(j) log A_kj
//!               + log N(x_n; μ_k, s²) }
//! ```
//!
//! (terms with a missing neighbour dropped), and the ELBO is
//!
//! ```text
//! ELBO(q) = Σ_k q_1(k) log π_k + Σ_{n≥2} Σ_{i,j} q_{n−1}(i) q_n(j) log A_ij
//!         + Σ_n Σ_k q_n(k) log N(x_n; μ_k, s²) − Σ_n Σ_k q_n(k) log q_n(k)
//!         = log p(x | θ) − KL(q ‖ p(z | x, θ)) ≤ log p(x | θ),
//! ```
//!
//! with equality exactly when the posterior factorises (for instance when all
//! rows of A are identical, an i.i.d. mixture).

use crate::{check_finite_data, ModelError, Result, HALF_LN_2PI};

/// How far from 1 a probability vector (π, or a row of A) may sum.
pub const PROB_SUM_TOL: f64 = 1e-6;

/// The exact posterior of the hidden states of an HMM given θ and x.
#[derive(Debug, Clone, PartialEq)]
pub struct HmmPosterior {
    /// Number of hidden states K.
    pub k: usize,
    /// Number of observations N.
    pub n: usize,
    /// `log p(x | θ)`, all normalising constants included.
    pub log_likelihood: f64,
    /// `p(z_n = k | x, θ)`, N×K row-major; each row sums to 1.
    pub marginals: Vec<f64>,
    /// Expected transition counts `Σ_{n=2}^{N} p(z_{n−1} = i, z_n = j | x, θ)`,
    /// K×K row-major (i is the row); the entries sum to N − 1.
    pub pairwise: Vec<f64>,
}

/// Validated parameters and data, in log space.
struct Prepared {
    k: usize,
    n: usize,
    log_pi: Vec<f64>,
    /// K×K row-major, `log A_ij` (−∞ for structural zeros).
    log_a: Vec<f64>,
    /// N×K row-major, `log N(x_n; μ_k, s²)`.
    log_e: Vec<f64>,
}

/// `log Σ_i exp(v_i)`, exact for any finite or −∞ entries; −∞ when all
/// entries are −∞ (or `v` is empty).
fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    m + v.iter().map(|&u| (u - m).exp()).sum::<f64>().ln()
}

/// Check that `p` is a probability vector: finite, in [0, 1], summing to 1
/// within [`PROB_SUM_TOL`].
pub(crate) fn check_probabilities(name: &'static str, p: &[f64]) -> Result<()> {
    if let Some(&v) = p.iter().find(|v| !v.is_finite() || **v < 0.0 || **v > 1.0) {
        return Err(ModelError::InvalidParameter {
            name,
            value: v,
            reason: "probabilities must be finite and in [0, 1]",
        });
    }
    let sum: f64 = p.iter().sum();
    if (sum - 1.0).abs() > PROB_SUM_TOL {
        return Err(ModelError::InvalidParameter {
            name,
            value: sum,
            reason: "probabilities must sum to 1 (within 1e-6)",
        });
    }
    Ok(())
}

/// Validate (π, A, μ, s, x) and precompute the logs.
fn prepare(pi: &[f64], a: &[f64], mu: &[f64], s: f64, x: &[f64]) -> Result<Prepared> {
    let k = pi.len();
    if k == 0 {
        return Err(ModelError::InvalidData(
            "the HMM needs at least one state (pi is empty)".into(),
        ));
    }
    if a.len() != k * k {
        return Err(ModelError::Shape {
            what: "a",
            expected: format!("[{k}, {k}] row-major ({} values)", k * k),
            got: vec![a.len() as i64],
        });
    }
    if mu.len() != k {
        return Err(ModelError::Shape {
            what: "mu",
            expected: format!("[{k}]"),
            got: vec![mu.len() as i64],
        });
    }
    check_probabilities("pi", pi)?;
    for row in a.chunks_exact(k) {
        check_probabilities("a", row)?;
    }
    if let Some(&v) = mu.iter().find(|v| !v.is_finite()) {
        return Err(ModelError::InvalidParameter {
            name: "mu",
            value: v,
            reason: "emission means must be finite",
        });
    }
    if !(s.is_finite() && s > 0.0) {
        return Err(ModelError::InvalidParameter {
            name: "s",
            value: s,
            reason: "the emission standard deviation must be finite and > 0",
        });
    }
    check_finite_data(x)?;
    let n = x.len();
    let ln_s = s.ln();
    let mut log_e = Vec::with_capacity(n * k);
    for (t, &xt) in x.iter().enumerate() {
        for (j, &m) in mu.iter().enumerate() {
            let r = (xt - m) / s;
            let le = -HALF_LN_2PI - ln_s - 0.5 * r * r;
            if !le.is_finite() {
                return Err(ModelError::InvalidData(format!(
                    "log N(x[{t}] = {xt}; mu[{j}] = {m}, s = {s}) is not finite in f64"
                )));
            }
            log_e.push(le);
        }
    }
    Ok(Prepared {
        k,
        n,
        log_pi: pi.iter().map(|p| p.ln()).collect(),
        log_a: a.iter().map(|p| p.ln()).collect(),
        log_e,
    })
}

/// Exact posterior inference by the forward–backward algorithm in log space.
///
/// Arguments: initial probabilities `pi` (K), transition matrix `a` (K×K
/// row-major, `a[i*K + j] = p(z_n = j | z_{n−1} = i)`, each row summing to 1
/// within [`PROB_SUM_TOL`]), emission means `mu` (K), common emission
/// standard deviation `s > 0` and observations `x` (N ≥ 1, finite).
/// Zero probabilities are allowed. Cost O(N K²) time and O(N K) memory; the
/// log-space recursions do not underflow for any N.
///
/// Errors: [`ModelError::Shape`] for inconsistent lengths,
/// [`ModelError::InvalidParameter`] for invalid π, A, μ or s,
/// [`ModelError::InvalidData`] for empty or non-finite data.
pub fn forward_backward(
    pi: &[f64],
    a: &[f64],
    mu: &[f64],
    s: f64,
    x: &[f64],
) -> Result<HmmPosterior> {
    let p = prepare(pi, a, mu, s, x)?;
    let (k, n) = (p.k, p.n);
    let mut buf = vec![0.0; k * k];

    // Forward pass.
    let mut la = vec![0.0; n * k];
    for ((l, &lp), &le) in la.iter_mut().zip(&p.log_pi).zip(&p.log_e) {
        *l = lp + le;
    }
    for t in 1..n {
        for j in 0..k {
            for i in 0..k {
                buf[i] = la[(t - 1) * k + i] + p.log_a[i * k + j];
            }
            la[t * k + j] = log_sum_exp(&buf[..k]) + p.log_e[t * k + j];
        }
    }
    let log_likelihood = log_sum_exp(&la[(n - 1) * k..]);
    if !log_likelihood.is_finite() {
        return Err(ModelError::InvalidData(format!(
            "log p(x | θ) = {log_likelihood} is not finite"
        )));
    }

    // Backward pass (log β_N = 0).
    let mut lb = vec![0.0; n * k];
    for t in (0..n.saturating_sub(1)).rev() {
        for i in 0..k {
            for j in 0..k {
                buf[j] = p.log_a[i * k + j] + p.log_e[(t + 1) * k + j] + lb[(t + 1) * k + j];
            }
            lb[t * k + i] = log_sum_exp(&buf[..k]);
        }
    }

    // Marginals, normalised per time step so each row sums to 1 exactly up
    // to rounding.
    let mut marginals = vec![0.0; n * k];
    for t in 0..n {
        for j in 0..k {
            buf[j] = la[t * k + j] + lb[t * k + j];
        }
        let z = log_sum_exp(&buf[..k]);
        for j in 0..k {
            marginals[t * k + j] = (buf[j] - z).exp();
        }
    }

    // Expected transition counts.
    let mut pairwise = vec![0.0; k * k];
    for t in 1..n {
        for i in 0..k {
            for j in 0..k {
                buf[i * k + j] =
                    la[(t - 1) * k + i] + p.log_a[i * k + j] + p.log_e[t * k + j] + lb[t * k + j];
            }
        }
        let z = log_sum_exp(&buf);
        for (acc, &v) in pairwise.iter_mut().zip(&buf) {
            *acc += (v - z).exp();
        }
    }

    Ok(HmmPosterior {
        k,
        n,
        log_likelihood,
        marginals,
        pairwise,
    })
}

/// One CAVI update of the factor `q_t` given its neighbours (`q` is N×K).
fn cavi_update(p: &Prepared, q: &mut [f64], t: usize, buf: &mut [f64]) {
    let k = p.k;
    for (j, b) in buf.iter_mut().enumerate().take(k) {
        let mut v = p.log_e[t * k + j];
        if t == 0 {
            v += p.log_pi[j];
        } else {
            v += (0..k)
                .map(|i| q[(t - 1) * k + i] * p.log_a[i * k + j])
                .sum::<f64>();
        }
        if t + 1 < p.n {
            v += (0..k)
                .map(|l| q[(t + 1) * k + l] * p.log_a[j * k + l])
                .sum::<f64>();
        }
        *b = v;
    }
    let z = log_sum_exp(&buf[..k]);
    for (qj, &b) in q[t * k..(t + 1) * k].iter_mut().zip(&buf[..k]) {
        *qj = (b - z).exp();
    }
}

/// `E_q[log p(x, z | θ)] + H(q)` for a fully factorised q (N×K), with the
/// convention 0 · log 0 = 0.
fn mean_field_elbo(p: &Prepared, q: &[f64]) -> f64 {
    let (k, n) = (p.k, p.n);
    let mut elbo = 0.0;
    for (&qj, &lp) in q[..k].iter().zip(&p.log_pi) {
        if qj > 0.0 {
            elbo += qj * lp;
        }
    }
    for t in 1..n {
        for i in 0..k {
            for j in 0..k {
                let w = q[(t - 1) * k + i] * q[t * k + j];
                if w > 0.0 {
                    elbo += w * p.log_a[i * k + j];
                }
            }
        }
    }
    for (&qj, &le) in q.iter().zip(&p.log_e) {
        if qj > 0.0 {
            elbo += qj * (le - qj.ln());
        }
    }
    elbo
}

/// Mean-field coordinate ascent (CAVI) for q(z) = ∏_n q_n(z_n) with θ fixed.
///
/// Starts from uniform factors q_n(k) = 1/K and performs `iters` sweeps
/// n = 1..N of the optimal single-factor update (see the module docs); each
/// update cannot decrease the ELBO. Returns the factors (N×K row-major,
/// `q[n*K + k] = q_n(k)`) and the final ELBO `E_q[log p(x, z | θ)] + H(q)`,
/// all normalising constants included. `iters = 0` returns the uniform
/// start and its ELBO.
///
/// Arguments are as for [`forward_backward`], except that every entry of `a`
/// must be strictly positive: with a structural zero in A the uniform start
/// has ELBO −∞ and the updates are ill-defined. Zeros in π are allowed.
pub fn mean_field_cavi(
    pi: &[f64],
    a: &[f64],
    mu: &[f64],
    s: f64,
    x: &[f64],
    iters: usize,
) -> Result<(Vec<f64>, f64)> {
    let p = prepare(pi, a, mu, s, x)?;
    if let Some(&v) = a.iter().find(|v| **v <= 0.0) {
        return Err(ModelError::InvalidParameter {
            name: "a",
            value: v,
            reason: "mean-field CAVI needs every transition probability to be > 0",
        });
    }
    let q = vec![1.0 / p.k as f64; p.n * p.k];
    cavi_sweeps(&p, q, iters)
}

/// [`mean_field_cavi`] from given factors `start` (N×K row-major, each row
/// a probability vector, for instance random ones: CAVI finds a local
/// optimum that depends on where it starts, so the best of several starts
/// is the usual reference).
pub fn mean_field_cavi_from(
    pi: &[f64],
    a: &[f64],
    mu: &[f64],
    s: f64,
    x: &[f64],
    start: &[f64],
    iters: usize,
) -> Result<(Vec<f64>, f64)> {
    let p = prepare(pi, a, mu, s, x)?;
    if let Some(&v) = a.iter().find(|v| **v <= 0.0) {
        return Err(ModelError::InvalidParameter {
            name: "a",
            value: v,
            reason: "mean-field CAVI needs every transition probability to be > 0",
        });
    }
    if start.len() != p.n * p.k {
        return Err(ModelError::InvalidData(format!(
            "start has {} values, expected N×K = {}",
            start.len(),
            p.n * p.k
        )));
    }
    for row in start.chunks(p.k) {
        check_probabilities("start", row)?;
    }
    cavi_sweeps(&p, start.to_vec(), iters)
}

fn cavi_sweeps(p: &Prepared, mut q: Vec<f64>, iters: usize) -> Result<(Vec<f64>, f64)> {
    let (k, n) = (p.k, p.n);
    let mut buf = vec![0.0; k];
    for _ in 0..iters {
        for t in 0..n {
            cavi_update(p, &mut q, t, &mut buf);
        }
    }
    let elbo = mean_field_elbo(p, &q);
    Ok((q, elbo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    /// Simulate N observations from the HMM (sampling states by inverse CDF).
    fn simulate(pi: &[f64], a: &[f64], mu: &[f64], s: f64, n: usize, seed: u64) -> Vec<f64> {
        let k = pi.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0, s).unwrap();
        let draw = |p: &[f64], rng: &mut ChaCha8Rng| {
            let u: f64 = rng.random();
            let mut c = 0.0;
            for (i, &pi) in p.iter().enumerate() {
                c += pi;
                if u < c {
                    return i;
                }
            }
            p.len() - 1
        };
        let mut z = draw(pi, &mut rng);
        let mut x = Vec::with_capacity(n);
        for t in 0..n {
            if t > 0 {
                z = draw(&a[z * k..(z + 1) * k], &mut rng);
            }
            x.push(mu[z] + noise.sample(&mut rng));
        }
        x
    }

    fn log_normal(x: f64, m: f64, s: f64) -> f64 {
        -HALF_LN_2PI - s.ln() - 0.5 * ((x - m) / s).powi(2)
    }

    /// Brute force over all K^N paths: (log p(x), marginals, pairwise).
    fn brute_force(
        pi: &[f64],
        a: &[f64],
        mu: &[f64],
        s: f64,
        x: &[f64],
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let (k, n) = (pi.len(), x.len());
        let paths = k.pow(n as u32);
        let mut log_joint = Vec::with_capacity(paths);
        let mut zs = Vec::with_capacity(paths);
        for code in 0..paths {
            let mut z = vec![0usize; n];
            let mut c = code;
            for zt in z.iter_mut() {
                *zt = c % k;
                c /= k;
            }
            let mut lp = pi[z[0]].ln() + log_normal(x[0], mu[z[0]], s);
            for t in 1..n {
                lp += a[z[t - 1] * k + z[t]].ln() + log_normal(x[t], mu[z[t]], s);
            }
            log_joint.push(lp);
            zs.push(z);
        }
        let ll = log_sum_exp(&log_joint);
        let mut marg = vec![0.0; n * k];
        let mut pair = vec![0.0; k * k];
        for (lp, z) in log_joint.iter().zip(&zs) {
            let w = (lp - ll).exp();
            for t in 0..n {
                marg[t * k + z[t]] += w;
                if t > 0 {
                    pair[z[t - 1] * k + z[t]] += w;
                }
            }
        }
        (ll, marg, pair)
    }

    fn model_k2() -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        (
            vec![0.6, 0.4],
            vec![0.9, 0.1, 0.2, 0.8],
            vec![-1.0, 1.5],
            0.8,
        )
    }

    fn model_k3() -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        (
            vec![0.5, 0.3, 0.2],
            vec![0.7, 0.2, 0.1, 0.15, 0.8, 0.05, 0.3, 0.3, 0.4],
            vec![-2.0, 0.0, 2.5],
            1.1,
        )
    }

    /// Forward–backward against enumeration of all K^N paths. Tolerance
    /// 1e-10 relative on log p(x) and 1e-10 absolute on probabilities: both
    /// sides are f64 sums of at most 81 terms of magnitude O(1–10), so the
    /// rounding error is ~1e-14; any algorithmic error (a missed constant, a
    /// wrong index) would be O(1e-2) or more.
    #[test]
    fn forward_backward_matches_brute_force() {
        for (model, n, seed) in [(model_k2(), 6, 11), (model_k3(), 4, 12)] {
            let (pi, a, mu, s) = model;
            let k = pi.len();
            let x = simulate(&pi, &a, &mu, s, n, seed);
            let post = forward_backward(&pi, &a, &mu, s, &x).unwrap();
            let (ll, marg, pair) = brute_force(&pi, &a, &mu, s, &x);
            assert_eq!((post.k, post.n), (k, n));
            assert!(
                (post.log_likelihood - ll).abs() <= 1e-10 * ll.abs(),
                "K={k}: forward-backward {} vs brute force {ll}",
                post.log_likelihood
            );
            for (u, v) in post.marginals.iter().zip(&marg) {
                assert!((u - v).abs() <= 1e-10, "marginal {u} vs {v}");
            }
            for (u, v) in post.pairwise.iter().zip(&pair) {
                assert!((u - v).abs() <= 1e-10, "pairwise {u} vs {v}");
            }
        }
    }

    /// Marginal rows sum to 1 and the expected transition counts sum to
    /// N − 1. Tolerance 1e-12 (relative for the counts): each row is
    /// normalised explicitly, so only a few ulps of rounding remain.
    #[test]
    fn marginals_are_normalised() {
        let (pi, a, mu, s) = model_k3();
        let x = simulate(&pi, &a, &mu, s, 200, 3);
        let post = forward_backward(&pi, &a, &mu, s, &x).unwrap();
        for row in post.marginals.chunks_exact(3) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
            assert!(row.iter().all(|p| (0.0..=1.0).contains(p)));
        }
        let total: f64 = post.pairwise.iter().sum();
        assert!((total - 199.0).abs() <= 1e-12 * 199.0, "{total}");
    }

    /// Long sequences do not underflow: N = 5000 and N = 10,000 give a finite
    /// log-likelihood of plausible size (between −10 and 0 nats per
    /// observation for s ≈ 1, a loose bound that only catches blow-ups), and
    /// the marginals stay normalised (1e-12, as above).
    #[test]
    fn long_sequences_stay_finite() {
        let (pi, a, mu, s) = model_k2();
        for n in [5000usize, 10_000] {
            let x = simulate(&pi, &a, &mu, s, n, 5);
            let post = forward_backward(&pi, &a, &mu, s, &x).unwrap();
            assert!(post.log_likelihood.is_finite());
            let per_obs = post.log_likelihood / n as f64;
            assert!((-10.0..0.0).contains(&per_obs), "{per_obs}");
            for row in post.marginals.chunks_exact(2) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
            }
        }
    }

    /// Structural zeros in π and A are handled (−∞ logs, never NaN): with
    /// A = identity the states never change, so log p(x) is the exact log
    /// of a two-component mixture over whole sequences. Tolerance 1e-12
    /// relative: a sum of 10 terms in f64.
    #[test]
    fn structural_zeros() {
        let pi = [1.0, 0.0];
        let a = [1.0, 0.0, 0.0, 1.0];
        let mu = [0.0, 3.0];
        let x = [0.1, -0.3, 0.5, 0.2, 0.0, 1.0, -1.0, 0.4, 0.3, 0.2];
        let post = forward_backward(&pi, &a, &mu, 1.0, &x).unwrap();
        let direct: f64 = x.iter().map(|&v| log_normal(v, 0.0, 1.0)).sum();
        assert!((post.log_likelihood - direct).abs() <= 1e-12 * direct.abs());
        assert!(post.marginals.chunks_exact(2).all(|r| r[1] == 0.0));
        assert!(post.pairwise.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_invalid_input() {
        let (pi, a, mu, s) = model_k2();
        let x = [0.0, 1.0];
        assert!(forward_backward(&pi, &a, &mu, s, &x).is_ok());
        assert!(forward_backward(&[], &[], &[], s, &x).is_err());
        assert!(forward_backward(&[0.5, 0.6], &a, &mu, s, &x).is_err());
        assert!(forward_backward(&pi, &[0.9, 0.1, 0.2, 0.7], &mu, s, &x).is_err());
        assert!(forward_backward(&pi, &a[..3], &mu, s, &x).is_err());
        assert!(forward_backward(&pi, &a, &mu[..1], s, &x).is_err());
        assert!(forward_backward(&pi, &a, &[0.0, f64::NAN], s, &x).is_err());
        assert!(forward_backward(&pi, &a, &mu, 0.0, &x).is_err());
        assert!(forward_backward(&pi, &a, &mu, f64::NAN, &x).is_err());
        assert!(forward_backward(&pi, &a, &mu, s, &[]).is_err());
        assert!(forward_backward(&pi, &a, &mu, s, &[0.0, f64::INFINITY]).is_err());
        assert!(forward_backward(&pi, &a, &mu, 1e-300, &[1e300]).is_err());
        assert!(forward_backward(&[1.5, -0.5], &a, &mu, s, &x).is_err());
        assert!(mean_field_cavi(&pi, &[1.0, 0.0, 0.2, 0.8], &mu, s, &x, 3).is_err());
        assert!(mean_field_cavi(&pi, &a, &mu, -1.0, &x, 3).is_err());
    }

    /// Every single-factor update, and hence every sweep, leaves the ELBO no
    /// lower. Tolerance 1e-12·(1 + |ELBO|): the ELBO is a sum of ~N K² = 450
    /// terms of size O(1), so evaluating it twice at (nearly) the same q
    /// differs by ~1e-13 of its magnitude; a genuine decrease from a wrong
    /// update is orders of magnitude larger.
    #[test]
    fn cavi_elbo_never_decreases() {
        let (pi, a, mu, s) = model_k3();
        let x = simulate(&pi, &a, &mu, s, 50, 21);
        let p = prepare(&pi, &a, &mu, s, &x).unwrap();
        let mut q = vec![1.0 / 3.0; 50 * 3];
        let mut buf = vec![0.0; 3];
        let mut prev = mean_field_elbo(&p, &q);
        for _sweep in 0..15 {
            for t in 0..50 {
                cavi_update(&p, &mut q, t, &mut buf);
                let e = mean_field_elbo(&p, &q);
                assert!(e >= prev - 1e-12 * (1.0 + e.abs()), "{e} < {prev}");
                prev = e;
            }
        }
        // The public function agrees with the per-sweep trace.
        let mut prev = f64::NEG_INFINITY;
        for iters in 0..15 {
            let (_, e) = mean_field_cavi(&pi, &a, &mu, s, &x, iters).unwrap();
            assert!(
                e >= prev - 1e-12 * (1.0 + e.abs()),
                "sweep {iters}: {e} < {prev}"
            );
            prev = e;
        }
    }

    /// ELBO ≤ log p(x | θ) (tolerance 1e-9·|log p|, far above rounding), and
    /// with sticky transitions the gap is strictly positive (> 1e-3 nats):
    /// mean field cannot represent the posterior's temporal correlations.
    #[test]
    fn cavi_elbo_below_log_likelihood() {
        let (pi, a, mu, s) = model_k2();
        let x = simulate(&pi, &a, &mu, s, 80, 8);
        let ll = forward_backward(&pi, &a, &mu, s, &x)
            .unwrap()
            .log_likelihood;
        let (q, elbo) = mean_field_cavi(&pi, &a, &mu, s, &x, 50).unwrap();
        assert!(elbo <= ll + 1e-9 * ll.abs(), "ELBO {elbo} > log p {ll}");
        assert!(ll - elbo > 1e-3, "gap {}", ll - elbo);
        for row in q.chunks_exact(2) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
        }
    }

    /// With identical rows of A (and π equal to that row) the states are
    /// i.i.d., the posterior factorises and mean field is exact after one
    /// sweep: ELBO = log p(x | θ) within 1e-9 absolute (|log p| ≈ 100 here,
    /// and both are f64 sums of ~10³ terms, so rounding is ~1e-12), and the
    /// factors equal the exact marginals within 1e-10.
    #[test]
    fn cavi_is_exact_for_iid_mixture() {
        let w = [0.2, 0.5, 0.3];
        let a: Vec<f64> = (0..3).flat_map(|_| w).collect();
        let mu = [-2.0, 0.5, 3.0];
        let s = 0.9;
        let x = simulate(&w, &a, &mu, s, 60, 99);
        let post = forward_backward(&w, &a, &mu, s, &x).unwrap();
        for iters in [1, 5] {
            let (q, elbo) = mean_field_cavi(&w, &a, &mu, s, &x, iters).unwrap();
            assert!(
                (elbo - post.log_likelihood).abs() <= 1e-9,
                "ELBO {elbo} vs log p {}",
                post.log_likelihood
            );
            for (u, v) in q.iter().zip(&post.marginals) {
                assert!((u - v).abs() <= 1e-10);
            }
        }
    }
}
