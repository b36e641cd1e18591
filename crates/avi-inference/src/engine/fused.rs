//! A fused CPU engine for the scalar models (linear, nonlinear, saw): the
//! training iteration of [`crate::testing::Trainer::step`] (draws → ELBO estimate →
//! gradient → Adam) in a few passes of plain Rust over the `[M, N]` draws,
//! with analytic derivatives of the model ([`FusedModel`]) instead of
//! libtorch's autograd.
//!
//! The objective is the one of [`crate::elbo_draws_batch`] for scalar θ and
//! scalar z_n under Gaussian factors: for draws m = 1..M with
//! θ_m = μ_θ + s_θ ε_θm and z_mn = μ_n + s_n ε_mn (s = exp(log_sd)),
//!
//! ```text
//! ELBO ≈ (1/M) Σ_m [ log p(θ_m, z_m, x) + ½ ε_θm² + ½ Σ_n ε_mn² ]
//!        + log s_θ + Σ_n log s_n + (N + 1) · ½ log 2π          (Entropy::Mc)
//! ```
//!
//! (with `Entropy::Analytic` the ½ ε² terms are replaced by ½ each). With
//! g_mn = ∂ log p / ∂z_mn and h_m = ∂ log p / ∂θ_m, its exact gradient is
//!
//! ```text
//! ∂/∂μ_n      = (1/M) Σ_m g_mn
//! ∂/∂log s_n  = (1/M) Σ_m g_mn ε_mn s_n + 1
//! ∂/∂μ_θ      = (1/M) Σ_m h_m
//! ∂/∂log s_θ  = (1/M) Σ_m h_m ε_θm s_θ + 1
//! ```
//!
//! (ε is held fixed: the ½ ε² terms of −log q have no reparameterisation
//! gradient.) F-VI and Const update the flat parameter vector with a Rust
//! [`Adam`] identical to libtorch's. A-VI with the polynomial or the MLP
//! does the same on the host (`fused/net.rs`): the function's `[N, 2]` rows by a
//! hand-written forward pass, the fused per-row gradients back-propagated
//! by hand, one Rust Adam over θ, the free edge rows and φ; the libtorch
//! parameters are written only when asked for ([`FusedTrainer::variational`],
//! [`FusedTrainer::into_variational`]). An inference function the host does
//! not know ([`crate::InferenceFunction::parts`] is `None`) runs on libtorch:
//! its rows read once, one backward pass of the fused row gradients, tch's
//! Adam.
//!
//! Everything on the host is computed in f64 whatever `opts.dtype` (the
//! libtorch parameters are kept in `opts.dtype`); the normals themselves are f32
//! Box–Muller values of a counter-based Philox4x32-10 generator keyed on
//! the seed, with counter (observation, draw group, step) — the scheme of
//! the CUDA kernels (`fused/rng.rs`) — so they depend neither on the number of
//! threads nor on the order of evaluation. The threads split the draws in
//! groups of four; results are deterministic for a given (seed, threads)
//! (the thread count changes only the order of the final sums). A
//! [`FusedTrainer`] keeps its threads in a pool (rayon) started at its first
//! step, rather than starting them at every step.
//!
//! The per-element closures handed to the passes are `#[inline(always)]`:
//! a closure compiled out of line is a call per element that the AVX2 build
//! does not vectorise (it made the nonlinear step 3.4× slower once).
//!
//! The per-observation passes are written without branches or calls
//! (polynomial sine, cosine and exponential in `fused/math.rs`, reductions into
//! fixed lanes) so that the compiler vectorises them; where the CPU has AVX2
//! (detected at run time) the same code runs compiled for AVX2, giving the
//! same bits on wider registers.

use std::thread;

use rayon::prelude::*;

use crate::forms::FusedModel;
use avi_models::{check_finite_data, HALF_LN_2PI};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::elbo::host_vec;
use crate::engine::{params_finite, seeded, Block, Draws as EngineDraws, Stepper};
use crate::method::{LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::options::{Entropy, FitOptions};
use crate::{InferenceError, Result};

mod math;
mod net;
mod rng;

/// Variational parameters of a scalar model on the host: q(θ) and every
/// q(z_n) (broadcast for Const, computed by f_φ for A-VI).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedParams {
    /// Mean of q(θ).
    pub theta_mean: f64,
    /// Log standard deviation of q(θ).
    pub theta_log_sd: f64,
    /// Means of q(z_n), length N.
    pub local_mean: Vec<f64>,
    /// Log standard deviations of q(z_n), length N.
    pub local_log_sd: Vec<f64>,
}

/// A Monte Carlo ELBO estimate and its exact gradient with respect to every
/// parameter of [`FusedParams`] (per-n local gradients, before any sharing).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedGrad {
    /// The ELBO estimate (mean over the draws).
    pub elbo: f64,
    /// ∂/∂ mean of q(θ).
    pub theta_mean: f64,
    /// ∂/∂ log-sd of q(θ).
    pub theta_log_sd: f64,
    /// ∂/∂ mean of q(z_n), length N.
    pub local_mean: Vec<f64>,
    /// ∂/∂ log-sd of q(z_n), length N.
    pub local_log_sd: Vec<f64>,
}

/// The ELBO estimate and its gradient at parameters `q` for given standard
/// normal draws: `eps_theta` has M values and `eps_z` is `[M, N]` row-major.
/// The same computation as [`FusedTrainer::step`], on one thread, for tests
/// and for callers with their own draws.
pub fn objective_and_grad(
    model: &FusedModel,
    x: &[f64],
    q: &FusedParams,
    eps_theta: &[f64],
    eps_z: &[f64],
    entropy: Entropy,
) -> Result<FusedGrad> {
    let (n, m) = (x.len(), eps_theta.len());
    if q.local_mean.len() != n || q.local_log_sd.len() != n || eps_z.len() != m * n || m == 0 {
        return Err(InferenceError::config(
            "draws",
            format!(
                "{} θ draws and {} z draws for N = {n} (local parameters: {} and {})",
                m,
                eps_z.len(),
                q.local_mean.len(),
                q.local_log_sd.len()
            ),
        ));
    }
    let prev = model.previous(x);
    let fill = FixedDraws {
        eps_theta,
        eps_z,
        n,
    };
    let view = ParamsView {
        theta_mean: q.theta_mean,
        theta_log_sd: q.theta_log_sd,
        mean: &q.local_mean,
        log_sd: &q.local_log_sd,
    };
    Ok(evaluate(
        model,
        x,
        &prev,
        &view,
        m,
        Workers::Scoped(1),
        entropy,
        &fill,
    ))
}

/// Borrowed parameters.
struct ParamsView<'a> {
    theta_mean: f64,
    theta_log_sd: f64,
    mean: &'a [f64],
    log_sd: &'a [f64],
}

/// One thread's sums over its draws.
struct Partial {
    elbo: f64,
    theta_mean: f64,
    theta_log_sd: f64,
    mean: Vec<f64>,
    log_sd: Vec<f64>,
}

impl Partial {
    fn zeros(n: usize) -> Self {
        Self {
            elbo: 0.0,
            theta_mean: 0.0,
            theta_log_sd: 0.0,
            mean: vec![0.0; n],
            log_sd: vec![0.0; n],
        }
    }
}

/// The standard normal draws of one step, in groups of four draws (the
/// unit of the Philox generator, see [`rng`]): group j holds draws
/// 4j … 4j + 3.
pub(crate) trait Draws: Sync {
    /// ε_θd.
    fn theta(&self, d: usize) -> f64;
    /// ε of the draws of group `group` at observations `start` … `start +
    /// len − 1` into `out` = `[4, len]` row-major (row k: draw 4·`group` +
    /// k); rows past the last draw are left as they are.
    fn fill(&self, group: usize, start: usize, out: &mut [f64]);
}

/// Given draws: `eps_theta` (M) and `eps_z` (`[M, N]` row-major).
pub(crate) struct FixedDraws<'a> {
    pub(crate) eps_theta: &'a [f64],
    pub(crate) eps_z: &'a [f64],
    pub(crate) n: usize,
}

impl Draws for FixedDraws<'_> {
    fn theta(&self, d: usize) -> f64 {
        self.eps_theta[d]
    }

    fn fill(&self, group: usize, start: usize, out: &mut [f64]) {
        let len = out.len() / 4;
        for (k, row) in out.chunks_mut(len).enumerate() {
            let d = 4 * group + k;
            if d < self.eps_theta.len() {
                let from = d * self.n + start;
                row.copy_from_slice(&self.eps_z[from..from + len]);
            }
        }
    }
}

/// The draws of one step of a fit (the step count as the Philox counter's
/// third word, the seed as its key; see [`rng`]).
struct PhiloxDraws {
    key: [u32; 2],
    step: u32,
}

impl Draws for PhiloxDraws {
    fn theta(&self, d: usize) -> f64 {
        rng::theta_normal(self.key, self.step, d)
    }

    #[inline(always)]
    fn fill(&self, group: usize, start: usize, out: &mut [f64]) {
        rng::fill_local(self.key, self.step, group as u32, start, out);
    }
}

/// Observations per block: the blocks of μ, s, x, x_{n−1}, the two gradient
/// accumulators and four draws (10 × 256 f64 = 20 KiB) stay in L1 while
/// every draw of a thread passes over them.
const BLOCK: usize = 256;

/// What every thread of one evaluation reads.
struct Ctx<'a, D> {
    model: FusedModel,
    x: &'a [f64],
    prev: &'a [f64],
    q: &'a ParamsView<'a>,
    sd: &'a [f64],
    theta_sd: f64,
    draws: usize,
    source: &'a D,
}

/// The threads a step's draws are split over.
#[derive(Clone, Copy)]
enum Workers<'a> {
    /// This many threads, started for the call (`std::thread::scope`).
    Scoped(usize),
    /// A pool's threads, started once: starting threads costs 50–100 µs
    /// each on a 2-core VM, a sixth of a saw step (0.3 ms).
    Pool(&'a rayon::ThreadPool),
}

impl Workers<'_> {
    /// Number of threads.
    fn count(self) -> usize {
        match self {
            Workers::Scoped(t) => t,
            Workers::Pool(pool) => pool.current_num_threads(),
        }
    }
}

/// The core: the groups of four draws split over the workers' threads
/// (contiguous ranges; the same ranges and the same order of the final sums
/// whether the threads are a pool's or started for the call, so the same
/// bits), each thread going over the observations block by block and,
/// within a block, draw by draw.
#[allow(clippy::too_many_arguments)]
fn evaluate<D: Draws>(
    model: &FusedModel,
    x: &[f64],
    prev: &[f64],
    q: &ParamsView<'_>,
    draws: usize,
    workers: Workers<'_>,
    entropy: Entropy,
    source: &D,
) -> FusedGrad {
    let n = x.len();
    let sd: Vec<f64> = q.log_sd.iter().map(|v| v.exp()).collect();
    let theta_sd = q.theta_log_sd.exp();
    let ctx = Ctx {
        model: *model,
        x,
        prev,
        q,
        sd: &sd,
        theta_sd,
        draws,
        source,
    };
    let groups = draws.div_ceil(4);
    let threads = workers.count().clamp(1, groups.max(1));
    let bounds = |t: usize| t * groups / threads;
    let parts: Vec<(Partial, f64)> = if threads == 1 {
        vec![work(&ctx, 0..groups)]
    } else if let Workers::Pool(pool) = workers {
        pool.install(|| {
            (0..threads)
                .into_par_iter()
                .map(|t| work(&ctx, bounds(t)..bounds(t + 1)))
                .collect()
        })
    } else {
        thread::scope(|s| {
            let handles: Vec<_> = (1..threads)
                .map(|t| {
                    let ctx = &ctx;
                    s.spawn(move || work(ctx, bounds(t)..bounds(t + 1)))
                })
                .collect();
            let mut parts = vec![work(&ctx, 0..bounds(1))];
            parts.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
            );
            parts
        })
    };
    let mc = entropy == Entropy::Mc;
    let mut total = Partial::zeros(n);
    for (p, sq) in parts {
        total.elbo += p.elbo;
        if mc {
            total.elbo += 0.5 * sq;
        }
        total.theta_mean += p.theta_mean;
        total.theta_log_sd += p.theta_log_sd;
        for (a, b) in total.mean.iter_mut().zip(&p.mean) {
            *a += b;
        }
        for (a, b) in total.log_sd.iter_mut().zip(&p.log_sd) {
            *a += b;
        }
    }
    let inv_m = (draws as f64).recip();
    let dims = (n + 1) as f64;
    let entropy_const = match entropy {
        Entropy::Mc => dims * HALF_LN_2PI,
        Entropy::Analytic => dims * (0.5 + HALF_LN_2PI),
    };
    let sum_log_sd: f64 = q.log_sd.iter().sum();
    let elbo = total.elbo * inv_m + model.constant(n) + sum_log_sd + q.theta_log_sd + entropy_const;
    for g in &mut total.mean {
        *g *= inv_m;
    }
    for (g, s) in total.log_sd.iter_mut().zip(&sd) {
        *g = *g * s * inv_m + 1.0;
    }
    FusedGrad {
        elbo,
        theta_mean: total.theta_mean * inv_m,
        theta_log_sd: total.theta_log_sd * theta_sd * inv_m + 1.0,
        local_mean: total.mean,
        local_log_sd: total.log_sd,
    }
}

/// Whether the CPU has AVX2 (detected at run time, cached by std).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// The passes below run compiled for AVX2 where the CPU has it: each
// `*_avx2` function is its portable twin (`#[inline(always)]`, so inlined
// and compiled a second time with AVX2 enabled): the same operations in the
// same order (no fused multiply-adds, no reassociation), so the same bits,
// on wider registers.

/// One thread's share: the sums over the draws of `groups` and Σ ε² over
/// them (θ's included).
#[allow(unsafe_code)]
fn work<D: Draws>(ctx: &Ctx<'_, D>, groups: std::ops::Range<usize>) -> (Partial, f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: `work_avx2` requires AVX2 and nothing else, and the CPU
        // has it (checked at run time just above).
        return unsafe { work_avx2(ctx, groups) };
    }
    work_impl(ctx, groups)
}

/// [`work_impl`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn work_avx2<D: Draws>(ctx: &Ctx<'_, D>, groups: std::ops::Range<usize>) -> (Partial, f64) {
    work_impl(ctx, groups)
}

/// [`work`] for the baseline target only (for tests).
#[cfg(test)]
fn work_portable<D: Draws>(ctx: &Ctx<'_, D>, groups: std::ops::Range<usize>) -> (Partial, f64) {
    work_impl(ctx, groups)
}

#[inline(always)]
fn work_impl<D: Draws>(c: &Ctx<'_, D>, groups: std::ops::Range<usize>) -> (Partial, f64) {
    let n = c.x.len();
    let mut p = Partial::zeros(n);
    let first = 4 * groups.start;
    let last = (4 * groups.end).min(c.draws);
    let e_theta: Vec<f64> = (first..last).map(|d| c.source.theta(d)).collect();
    let theta: Vec<f64> = e_theta
        .iter()
        .map(|e| c.q.theta_mean + c.theta_sd * e)
        .collect();
    // Per draw: Σ_n ℓ, Σ_n ∂ℓ/∂θ; and Σ ε² over all.
    let mut sums = vec![(0.0, 0.0); theta.len()];
    let mut sq = 0.0;
    let mut eps = vec![0.0; 4 * BLOCK.min(n)];
    let mut scratch = vec![0.0; 2 * BLOCK.min(n)];
    let scratch = &mut scratch[..];
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let len = end - start;
        let eps = &mut eps[..4 * len];
        let (gm, gs) = (&mut p.mean[start..end], &mut p.log_sd[start..end]);
        for g in groups.clone() {
            c.source.fill(g, start, eps);
            for (k, row) in eps.chunks(len).enumerate() {
                let d = 4 * g + k;
                if d >= last {
                    break;
                }
                let i = d - first;
                let t = theta[i];
                let mut acc = RowAcc {
                    eps: row,
                    mean: &c.q.mean[start..end],
                    sd: &c.sd[start..end],
                    x: &c.x[start..end],
                    prev: &c.prev[start..end],
                    g_mean: gm,
                    g_log_sd: gs,
                };
                let (value, d_theta, s) = match c.model {
                    FusedModel::Linear { tau, sigma } => {
                        let inv = sigma.recip();
                        acc.run(
                            scratch,
                            #[inline(always)]
                            |z, x, _| crate::forms::linear_term(tau, inv, t, z, x),
                        )
                    }
                    FusedModel::Nonlinear if acc.tame() => acc.run(
                        scratch,
                        #[inline(always)]
                        |z, x, _| math::nonlinear_term(t, z, x),
                    ),
                    FusedModel::Nonlinear => acc.run(
                        scratch,
                        #[inline(always)]
                        |z, x, _| crate::forms::nonlinear_term(t, z, x),
                    ),
                    FusedModel::NonlinearAuthors if acc.tame() => acc.run(
                        scratch,
                        #[inline(always)]
                        |z, x, _| math::nonlinear_authors_term(t, z, x),
                    ),
                    FusedModel::NonlinearAuthors => acc.run(
                        scratch,
                        #[inline(always)]
                        |z, x, _| crate::forms::nonlinear_authors_term(t, z, x),
                    ),
                    FusedModel::Saw { alpha, .. } => acc.run(
                        scratch,
                        #[inline(always)]
                        |z, x, prev| crate::forms::saw_term(alpha, t, z, x, prev),
                    ),
                };
                sums[i].0 += value;
                sums[i].1 += d_theta;
                sq += s;
            }
        }
    }
    for ((&t, &e), (value, d_theta)) in theta.iter().zip(&e_theta).zip(sums) {
        let (lp_theta, dlp_theta) = c.model.log_prior(t);
        p.elbo += lp_theta + value;
        sq += e * e;
        let h = dlp_theta + d_theta;
        p.theta_mean += h;
        p.theta_log_sd += h * e;
    }
    (p, sq)
}

/// The inputs and accumulators of one draw's pass over a block of
/// observations.
struct RowAcc<'a> {
    eps: &'a [f64],
    mean: &'a [f64],
    sd: &'a [f64],
    x: &'a [f64],
    prev: &'a [f64],
    g_mean: &'a mut [f64],
    g_log_sd: &'a mut [f64],
}

impl RowAcc<'_> {
    /// Whether every z_n = μ_n + s_n ε_n of the pass is in the domain of
    /// the vectorisable sine and cosine (|z| < [`math::TRIG_LIMIT`]; a NaN
    /// is not).
    #[inline(always)]
    fn tame(&self) -> bool {
        let tame: usize = self
            .eps
            .iter()
            .zip(self.mean)
            .zip(self.sd)
            .map(|((e, m), s)| usize::from((m + s * e).abs() < math::TRIG_LIMIT))
            .sum();
        tame == self.eps.len()
    }

    /// z_n = μ_n + s_n ε_n; `term(z, x, prev)` gives (ℓ, ∂ℓ/∂z, ∂ℓ/∂θ).
    /// Accumulates Σ_m g and Σ_m g ε per n; returns (Σ_n ℓ, Σ_n ∂ℓ/∂θ,
    /// Σ_n ε²). The elementwise pass keeps ℓ and ∂ℓ/∂θ in `scratch` (no
    /// reduction in it, so the compiler vectorises it); the sums follow in
    /// [`lane_sum`]'s fixed order.
    #[inline(always)]
    fn run(
        &mut self,
        scratch: &mut [f64],
        term: impl Fn(f64, f64, f64) -> (f64, f64, f64),
    ) -> (f64, f64, f64) {
        let n = self.x.len();
        let (values, d_thetas) = scratch[..2 * n].split_at_mut(n);
        for ((((((e, m), s), x), prev), (gm, gs)), (v_out, t_out)) in self
            .eps
            .iter()
            .zip(self.mean)
            .zip(self.sd)
            .zip(self.x)
            .zip(self.prev)
            .zip(self.g_mean.iter_mut().zip(self.g_log_sd.iter_mut()))
            .zip(values.iter_mut().zip(d_thetas.iter_mut()))
        {
            let (v, dz, dt) = term(m + s * e, *x, *prev);
            *v_out = v;
            *t_out = dt;
            *gm += dz;
            *gs += dz * e;
        }
        (lane_sum(values), lane_sum(d_thetas), lane_sum_sq(self.eps))
    }
}

/// Independent partial sums (lets the compiler vectorise a reduction while
/// fixing its order).
const LANES: usize = 8;

/// Σ of `values`: element i goes to partial sum i mod [`LANES`], then the
/// partial sums are added in order.
#[inline(always)]
fn lane_sum(values: &[f64]) -> f64 {
    lane_sum_of(values, |v| v)
}

/// Σ v² over `values`, in the order of [`lane_sum`].
#[inline(always)]
fn lane_sum_sq(values: &[f64]) -> f64 {
    lane_sum_of(values, |v| v * v)
}

/// Σ f(v) over `values`, in the order of [`lane_sum`].
#[inline(always)]
fn lane_sum_of(values: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(*v);
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a += f(*v);
    }
    acc.iter().sum()
}

/// Σ a_i b_i: element i goes to partial sum i mod 16, then the partial
/// sums are added in order (16 lanes: four independent AVX2 accumulators,
/// enough to hide the latency of the additions).
#[inline(always)]
fn lane_dot(a: &[f64], b: &[f64]) -> f64 {
    const L: usize = 16;
    let mut acc = [0.0; L];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let whole = n - n % L;
    for (ca, cb) in a[..whole].chunks_exact(L).zip(b[..whole].chunks_exact(L)) {
        for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    for ((s, x), y) in acc.iter_mut().zip(&a[whole..]).zip(&b[whole..]) {
        *s += x * y;
    }
    acc.iter().sum()
}

/// Adam exactly as libtorch's `torch::optim::Adam` with tch's defaults
/// (β = (0.9, 0.999), ε = 1e-8, no weight decay, no AMSGrad), on a flat
/// f64 vector: `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
/// `p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)`.
#[derive(Debug, Clone)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    t: i32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    /// Set the learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Fresh state for `len` parameters.
    pub fn new(lr: f64, len: usize) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One update of `params` from the gradient `grad` of the loss being
    /// minimised (same length as at [`Adam::new`]).
    ///
    /// # Panics
    /// If `params`, `grad` and the state differ in length (a layout bug,
    /// which zipping would otherwise hide).
    pub fn step(&mut self, params: &mut [f64], grad: &[f64]) {
        assert!(
            params.len() == grad.len() && grad.len() == self.m.len(),
            "Adam: {} parameters, {} gradients, state for {}",
            params.len(),
            grad.len(),
            self.m.len()
        );
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let step_size = self.lr / (1.0 - b1.powi(self.t));
        let bias2_sqrt = (1.0 - b2.powi(self.t)).sqrt();
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bias2_sqrt + self.eps);
        }
    }
}

/// Where the parameters live.
enum State {
    /// F-VI (`shared: false`, layout `[μ_θ, log s_θ, μ_1..μ_N, log s_1..
    /// log s_N]`) or Const (`shared: true`, `[μ_θ, log s_θ, μ, log s]`),
    /// updated by the Rust [`Adam`].
    Flat {
        params: Vec<f64>,
        adam: Adam,
        shared: bool,
    },
    /// A-VI with an inference function the host knows (polynomial, MLP):
    /// evaluated and differentiated in f64 by [`net`], updated by the Rust
    /// [`Adam`]; the libtorch parameters are written when asked for.
    Host(Box<HostAvi>),
    /// A-VI with any other inference function: the libtorch parameters and
    /// tch's Adam.
    Torch {
        var: Box<Variational>,
        optimizer: nn::Optimizer,
    },
}

/// A-VI on the host: `params` = `[μ_θ, log s_θ, free edge rows (mean,
/// log-sd per row: the first `before` rows, then the last `after`), φ]`.
struct HostAvi {
    var: Box<Variational>,
    net: net::HostNet,
    params: Vec<f64>,
    slots: Vec<net::Slot>,
    adam: Adam,
    before: usize,
    after: usize,
}

impl HostAvi {
    /// The host copy of `var`'s A-VI parameters; `None` when the function
    /// or the factors are not ones the host evaluates.
    fn new(var: Variational, lr: f64) -> Result<std::result::Result<Self, Variational>> {
        let (
            LocalFactor::Amortized {
                function,
                inputs,
                edges,
                ..
            },
            ThetaFactor::Free(q),
        ) = (&var.local, &var.theta)
        else {
            return Ok(Err(var));
        };
        let Some(parts) = function.parts() else {
            return Ok(Err(var));
        };
        if q.numel() != 1 {
            return Ok(Err(var));
        }
        let mut params = Vec::new();
        let mut slots = Vec::new();
        for t in [&q.mean, &q.log_sd] {
            slots.push(net::Slot {
                tensor: t.shallow_clone(),
                start: params.len(),
            });
            params.extend(host_vec(t)?);
        }
        let (mut before, mut after) = (0, 0);
        if let Some((head, tail)) = edges {
            for (t, rows) in [(head, &mut before), (tail, &mut after)] {
                *rows = t.size().first().map_or(0, |r| *r as usize);
                slots.push(net::Slot {
                    tensor: t.shallow_clone(),
                    start: params.len(),
                });
                params.extend(host_vec(t)?);
            }
        }
        let net = net::HostNet::new(parts, inputs, &mut params, &mut slots)?;
        if params.len() != 2 + 2 * (before + after) + net.len() {
            return Ok(Err(var));
        }
        let adam = Adam::new(lr, params.len());
        Ok(Ok(Self {
            var: Box::new(var),
            net,
            params,
            slots,
            adam,
            before,
            after,
        }))
    }

    /// Where φ starts in `params`.
    fn phi_at(&self) -> usize {
        2 + 2 * (self.before + self.after)
    }

    /// The rows of q(z_n): the free edge rows and f_φ's.
    fn rows(&self, n: usize) -> (Vec<f64>, Vec<f64>) {
        let (b, a) = (self.before, self.after.min(n.saturating_sub(self.before)));
        let (mut mean, mut log_sd) = (vec![0.0; n], vec![0.0; n]);
        let edge = |r: usize| (self.params[2 + 2 * r], self.params[3 + 2 * r]);
        for r in 0..b {
            (mean[r], log_sd[r]) = edge(r);
        }
        for r in 0..a {
            (mean[n - a + r], log_sd[n - a + r]) = edge(b + r);
        }
        let phi = &self.params[self.phi_at()..];
        net::forward(
            &self.net,
            phi,
            b..n - a,
            &mut mean[b..n - a],
            &mut log_sd[b..n - a],
        );
        (mean, log_sd)
    }

    /// The gradient of −ELBO with respect to `params` from the fused
    /// gradient `g` at the rows of [`HostAvi::rows`].
    fn loss_grad(&self, g: &FusedGrad) -> Vec<f64> {
        let n = g.local_mean.len();
        let (b, a) = (self.before, self.after.min(n.saturating_sub(self.before)));
        let mut grad = vec![0.0; self.params.len()];
        grad[0] = -g.theta_mean;
        grad[1] = -g.theta_log_sd;
        for (r, i) in (0..b).chain(n - a..n).enumerate() {
            grad[2 + 2 * r] = -g.local_mean[i];
            grad[3 + 2 * r] = -g.local_log_sd[i];
        }
        let d_mean: Vec<f64> = g.local_mean[b..n - a].iter().map(|v| -v).collect();
        let d_log_sd: Vec<f64> = g.local_log_sd[b..n - a].iter().map(|v| -v).collect();
        let at = self.phi_at();
        let (phi, d_phi) = (&self.params[at..], &mut grad[at..]);
        net::backward(&self.net, phi, b..n - a, &d_mean, &d_log_sd, d_phi);
        grad
    }

    /// The libtorch parameters, brought up to date.
    fn synced(&self) -> &Variational {
        net::write_back(&self.slots, &self.params);
        &self.var
    }
}

/// The fused training loop of a scalar model: [`FusedTrainer::step`] is one
/// iteration of [`crate::testing::Trainer::step`] (same initial parameters for the
/// same seed, same objective, same Adam), with its own random draws.
pub struct FusedTrainer {
    model: FusedModel,
    x: Vec<f64>,
    prev: Vec<f64>,
    draws: usize,
    entropy: Entropy,
    seed: u64,
    steps_done: u64,
    threads: usize,
    /// The pool of `threads` threads, started at the first step with more
    /// than one thread.
    pool: Option<rayon::ThreadPool>,
    state: State,
    kind: Kind,
    rng: EngineDraws,
}

impl std::fmt::Debug for FusedTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedTrainer")
            .field("model", &self.model)
            .field("n", &self.x.len())
            .field("draws", &self.draws)
            .field("threads", &self.threads)
            .field("steps_done", &self.steps_done)
            .finish()
    }
}

impl FusedTrainer {
    /// Validate the options and data, seed libtorch's generator with
    /// `opts.seed` and initialise the parameters of `method` exactly as
    /// [`crate::testing::Trainer::new`] does. Only full batches, free q(θ) and
    /// `Device::Cpu` are supported. Threads default to the available
    /// parallelism (see [`FusedTrainer::with_threads`]).
    pub fn new(
        model: &FusedModel,
        x: &[f64],
        method: &MethodConfig,
        opts: &FitOptions,
        device: Device,
    ) -> Result<Self> {
        opts.check()?;
        check_finite_data(x)?;
        if device != Device::Cpu {
            return Err(InferenceError::config(
                "device",
                "the fused engine runs on the CPU; use Trainer for other devices",
            ));
        }
        if opts.batch_size.is_some() {
            return Err(InferenceError::config(
                "batch_size",
                "the fused engine supports full batches only",
            ));
        }
        let kind = opts.dtype.kind();
        let (var, rng) = initial_variational(model, x, method, opts, device)?;
        let state = match method {
            MethodConfig::Fvi | MethodConfig::Const => {
                let params = flat_params(&var)?;
                let len = params.len();
                State::Flat {
                    params,
                    adam: Adam::new(opts.lr, len),
                    shared: *method == MethodConfig::Const,
                }
            }
            MethodConfig::Avi { .. } => match HostAvi::new(var, opts.lr)? {
                Ok(host) => State::Host(Box::new(host)),
                Err(var) => {
                    let optimizer = nn::Adam::default().build(&var.vs, opts.lr)?;
                    State::Torch {
                        var: Box::new(var),
                        optimizer,
                    }
                }
            },
        };
        Ok(Self {
            model: *model,
            x: x.to_vec(),
            prev: model.previous(x),
            draws: opts.draws,
            entropy: opts.entropy,
            seed: opts.seed,
            steps_done: 0,
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
            pool: None,
            state,
            kind,
            rng,
        })
    }

    /// Split the draws of each step over `threads` threads (at least 1).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self.pool = None;
        self
    }

    /// Start the pool of `threads` threads if there is more than one and it
    /// is not running yet (if the system refuses to start them, each step
    /// starts its own: slower, same bits).
    fn start_pool(&mut self) {
        if self.threads > 1 && self.pool.is_none() {
            self.pool = rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .thread_name(|i| format!("avi-fused-{i}"))
                .build()
                .ok();
        }
    }

    /// One iteration: draw, estimate the ELBO and its gradient, Adam step.
    /// Returns the ELBO estimate (before the update).
    pub fn step(&mut self) -> Result<f64> {
        let (seed, step, n) = (self.seed, self.steps_done, self.x.len());
        let fill = PhiloxDraws {
            key: rng::key(seed),
            step: (step + 1) as u32,
        };
        self.start_pool();
        // `pool` is running exactly when `threads` > 1 (unless it failed to start).
        let workers = match &self.pool {
            Some(pool) => Workers::Pool(pool),
            None => Workers::Scoped(self.threads),
        };
        // The step's estimate and gradient at given local rows (borrows the
        // problem's fields only, not the state matched below).
        let evaluate_at = |view: &ParamsView<'_>| {
            evaluate(
                &self.model,
                &self.x,
                &self.prev,
                view,
                self.draws,
                workers,
                self.entropy,
                &fill,
            )
        };
        let elbo = match &mut self.state {
            State::Flat {
                params,
                adam,
                shared,
            } => {
                let (theta, local) = params.split_at(2);
                let width = local.len() / 2;
                let (mean, log_sd) = local.split_at(width);
                let broadcast;
                let view = if *shared {
                    broadcast = (vec![mean[0]; n], vec![log_sd[0]; n]);
                    ParamsView {
                        theta_mean: theta[0],
                        theta_log_sd: theta[1],
                        mean: &broadcast.0,
                        log_sd: &broadcast.1,
                    }
                } else {
                    ParamsView {
                        theta_mean: theta[0],
                        theta_log_sd: theta[1],
                        mean,
                        log_sd,
                    }
                };
                let g = evaluate_at(&view);
                // Adam minimises −ELBO.
                let mut grad = Vec::with_capacity(params.len());
                grad.push(-g.theta_mean);
                grad.push(-g.theta_log_sd);
                if *shared {
                    grad.push(-g.local_mean.iter().sum::<f64>());
                    grad.push(-g.local_log_sd.iter().sum::<f64>());
                } else {
                    grad.extend(g.local_mean.iter().map(|v| -v));
                    grad.extend(g.local_log_sd.iter().map(|v| -v));
                }
                adam.step(params, &grad);
                g.elbo
            }
            State::Host(host) => {
                let (mean, log_sd) = host.rows(n);
                let view = ParamsView {
                    theta_mean: host.params[0],
                    theta_log_sd: host.params[1],
                    mean: &mean,
                    log_sd: &log_sd,
                };
                let g = evaluate_at(&view);
                let grad = host.loss_grad(&g);
                host.adam.step(&mut host.params, &grad);
                g.elbo
            }
            State::Torch { var, optimizer } => {
                optimizer.zero_grad();
                let elbo = torch_backward(
                    var,
                    &self.model,
                    &self.x,
                    &self.prev,
                    self.draws,
                    workers,
                    self.entropy,
                    &fill,
                )?;
                optimizer.step();
                elbo
            }
        };
        self.steps_done += 1;
        Ok(elbo)
    }

    /// The current parameters: q(θ) and every q(z_n) (Const's shared factor
    /// repeated N times; A-VI's computed by the inference function).
    pub fn params(&self) -> Result<FusedParams> {
        let n = self.x.len();
        match &self.state {
            State::Flat { params, shared, .. } => {
                let local = &params[2..];
                let width = local.len() / 2;
                let (mean, log_sd) = local.split_at(width);
                Ok(FusedParams {
                    theta_mean: params[0],
                    theta_log_sd: params[1],
                    local_mean: if *shared {
                        vec![mean[0]; n]
                    } else {
                        mean.to_vec()
                    },
                    local_log_sd: if *shared {
                        vec![log_sd[0]; n]
                    } else {
                        log_sd.to_vec()
                    },
                })
            }
            State::Host(host) => {
                let (local_mean, local_log_sd) = host.rows(n);
                Ok(FusedParams {
                    theta_mean: host.params[0],
                    theta_log_sd: host.params[1],
                    local_mean,
                    local_log_sd,
                })
            }
            State::Torch { var, .. } => {
                let (theta_mean, theta_log_sd) = theta_host(var)?;
                let rows = tch::no_grad(|| host_vec(&var.local_raw()))?;
                Ok(FusedParams {
                    theta_mean,
                    theta_log_sd,
                    local_mean: rows.iter().step_by(2).copied().collect(),
                    local_log_sd: rows.iter().skip(1).step_by(2).copied().collect(),
                })
            }
        }
    }

    /// The fitted parameters as a [`Variational`] (F-VI and Const rebuilt
    /// from the host values in the fit's dtype; A-VI's own), for evaluation
    /// and further work (e.g. the §5 diagnostic).
    pub fn into_variational(self) -> Result<Variational> {
        Ok(self.into_parts()?.0)
    }

    /// The fitted parameters and the generator the fit's evaluation draws
    /// from.
    fn into_parts(self) -> Result<(Variational, EngineDraws)> {
        let n = self.x.len();
        let var = match self.state {
            State::Host(host) => {
                host.synced();
                *host.var
            }
            State::Torch { var, .. } => *var,
            State::Flat { params, shared, .. } => {
                flat_variational(&params, shared, n, self.kind, Device::Cpu)
            }
        };
        Ok((var, self.rng))
    }

    /// Set the learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        match &mut self.state {
            State::Flat { adam, .. } => adam.set_lr(lr),
            State::Host(host) => host.adam.set_lr(lr),
            State::Torch { optimizer, .. } => optimizer.set_lr(lr),
        }
    }

    /// Whether every variational parameter is finite (no copy: the flat
    /// vector, or A-VI's libtorch parameters).
    pub fn params_finite(&self) -> bool {
        match &self.state {
            State::Flat { params, .. } => params.iter().all(|v| v.is_finite()),
            State::Host(host) => host.params.iter().all(|v| v.is_finite()),
            State::Torch { var, .. } => params_finite(&var.vs),
        }
    }

    /// A-VI's libtorch parameters, up to date (the host network's values
    /// are written into them first); `None` for F-VI and Const.
    pub fn variational(&self) -> Option<&Variational> {
        match &self.state {
            State::Host(host) => Some(host.synced()),
            State::Torch { var, .. } => Some(var),
            State::Flat { .. } => None,
        }
    }

    /// Number of learned scalars (as [`Variational::num_parameters`]).
    pub fn num_parameters(&self) -> usize {
        match &self.state {
            State::Flat { params, .. } => params.len(),
            State::Host(host) => host.var.num_parameters(),
            State::Torch { var, .. } => var.num_parameters(),
        }
    }

    /// Threads the draws are split over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }
}

/// Validate `x`, seed libtorch's generator with `opts.seed` and initialise
/// the parameters of `method` on the CPU exactly as [`crate::testing::Trainer::new`]
/// does (shared by the fused engines).
/// Returns the parameters with the generator that continues the stream on
/// `device` (where the fit's final ELBO is evaluated).
pub(crate) fn initial_variational(
    model: &FusedModel,
    x: &[f64],
    method: &MethodConfig,
    opts: &FitOptions,
    device: Device,
) -> Result<(Variational, EngineDraws)> {
    let full = model.model()?;
    let kind = opts.dtype.kind();
    let xt = Tensor::from_slice(x).to_kind(kind);
    seeded(opts.seed, device, || {
        Variational::for_model(method, full.as_ref(), &xt, None, kind, Device::Cpu)
    })
}

/// The flat parameter vector `[μ_θ, log s_θ, μ_1.., log s_1..]` of an F-VI
/// or Const [`Variational`] (the factor parameters themselves: `[N, 2]` for
/// F-VI, `[1, 2]` for Const).
pub(crate) fn flat_params(var: &Variational) -> Result<Vec<f64>> {
    let (tm, tls) = theta_host(var)?;
    let rows = match &var.local {
        LocalFactor::Free(p) | LocalFactor::Shared(p) => host_vec(p)?,
        LocalFactor::Amortized { .. } => {
            return Err(InferenceError::config(
                "method",
                "an amortized factor has no flat parameter vector",
            ))
        }
    };
    let mut params = vec![tm, tls];
    params.extend(rows.iter().step_by(2));
    params.extend(rows.iter().skip(1).step_by(2));
    Ok(params)
}

/// The [`Variational`] of a flat parameter vector (see [`flat_params`]) on
/// `device` in `kind`; `shared` for Const.
pub(crate) fn flat_variational(
    params: &[f64],
    shared: bool,
    n: usize,
    kind: Kind,
    device: Device,
) -> Variational {
    let t = |v: &[f64]| Tensor::from_slice(v).to_kind(kind).to_device(device);
    let local = &params[2..];
    let width = local.len() / 2;
    let (mean, log_sd) = local.split_at(width);
    let rows: Vec<f64> = mean
        .iter()
        .zip(log_sd)
        .flat_map(|(m, s)| [*m, *s])
        .collect();
    Variational::from_gaussian_parts(
        &t(&params[..1]),
        &t(&params[1..2]),
        &t(&rows).view([width as i64, 2]),
        shared,
        n,
    )
}

/// (mean, log-sd) of a scalar q(θ).
fn theta_host(var: &Variational) -> Result<(f64, f64)> {
    match &var.theta {
        ThetaFactor::Free(q) if q.numel() == 1 => {
            Ok((q.mean.double_value(&[0]), q.log_sd.double_value(&[0])))
        }
        _ => Err(InferenceError::config(
            "theta",
            "the fused engine needs a free scalar q(θ)",
        )),
    }
}

/// Accumulate the gradient of −ELBO into the `.grad` of every parameter of
/// `var` (the caller zeroes them first) and return the ELBO estimate: the
/// inference function's `[N, 2]` rows are computed with autograd and read
/// once, the fused kernel gives ∂ELBO/∂rows and ∂ELBO/∂q(θ), and one
/// backward pass of `−(⟨rows, ∂rows⟩ + μ_θ ∂μ_θ + log s_θ ∂log s_θ)` carries
/// them to every parameter.
#[allow(clippy::too_many_arguments)]
fn torch_backward<D: Draws>(
    var: &Variational,
    model: &FusedModel,
    x: &[f64],
    prev: &[f64],
    draws: usize,
    workers: Workers<'_>,
    entropy: Entropy,
    fill: &D,
) -> Result<f64> {
    let raw = var.local_raw();
    let kind = raw.kind();
    let rows = host_vec(&raw)?;
    let mean: Vec<f64> = rows.iter().step_by(2).copied().collect();
    let log_sd: Vec<f64> = rows.iter().skip(1).step_by(2).copied().collect();
    let (theta_mean, theta_log_sd) = theta_host(var)?;
    let view = ParamsView {
        theta_mean,
        theta_log_sd,
        mean: &mean,
        log_sd: &log_sd,
    };
    let g = evaluate(model, x, prev, &view, draws, workers, entropy, fill);
    let mut g_rows = Vec::with_capacity(rows.len());
    for (a, b) in g.local_mean.iter().zip(&g.local_log_sd) {
        g_rows.push(-a);
        g_rows.push(-b);
    }
    let g_rows = Tensor::from_slice(&g_rows)
        .view([x.len() as i64, 2])
        .to_kind(kind);
    let ThetaFactor::Free(q) = &var.theta else {
        unreachable!("theta_host checked q(θ)")
    };
    let surrogate = (&raw * &g_rows).sum(kind)
        - (&q.mean * g.theta_mean).sum(kind)
        - (&q.log_sd * g.theta_log_sd).sum(kind);
    surrogate.backward();
    Ok(g.elbo)
}

#[cfg(test)]
mod tests;

impl Stepper for FusedTrainer {
    /// Steps one at a time on the host; stops after a non-finite estimate.
    fn steps(&mut self, len: usize) -> Result<Block> {
        let mut values = Vec::with_capacity(len);
        let mut stamps = Vec::with_capacity(len);
        for _ in 0..len {
            let elbo = self.step()?;
            values.push(elbo);
            stamps.push(std::time::Instant::now());
            if !elbo.is_finite() {
                break;
            }
        }
        Ok(Block {
            values,
            stamps: Some(stamps),
        })
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        FusedTrainer::set_lr(self, lr);
        Ok(())
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        Ok(vec![FusedTrainer::params_finite(self)])
    }

    fn monitor(
        &mut self,
        _run: usize,
        f: &mut dyn FnMut(&Variational) -> Result<()>,
    ) -> Result<()> {
        match &self.state {
            State::Flat { params, shared, .. } => f(&flat_variational(
                params,
                *shared,
                self.x.len(),
                self.kind,
                Device::Cpu,
            )),
            State::Host(host) => f(host.synced()),
            State::Torch { var, .. } => f(var),
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, EngineDraws)>> {
        Ok(vec![self.into_parts()?])
    }
}
