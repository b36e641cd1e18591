//! The fused engine's passes: the ELBO estimate and its exact gradient in
//! a few passes of plain Rust over the `[M, N]` draws (see the parent
//! module's documentation for the formulas), split over threads in groups
//! of four draws, with an AVX2 build where the CPU has it.

use std::thread;

use rayon::prelude::*;

use avi_models::HALF_LN_2PI;
use tch::Tensor;

use super::math;
use super::rng;
use crate::family::host_vec;
use crate::forms::FusedModel;
use crate::method::{ThetaFactor, Variational};
use crate::options::Entropy;
use crate::{InferenceError, Result};

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
/// The same computation as [`super::FusedTrainer::step`], on one thread, for tests
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
pub(crate) struct ParamsView<'a> {
    pub(crate) theta_mean: f64,
    pub(crate) theta_log_sd: f64,
    pub(crate) mean: &'a [f64],
    pub(crate) log_sd: &'a [f64],
}

/// One thread's sums over its draws.
pub(crate) struct Partial {
    pub(crate) elbo: f64,
    pub(crate) theta_mean: f64,
    pub(crate) theta_log_sd: f64,
    pub(crate) mean: Vec<f64>,
    pub(crate) log_sd: Vec<f64>,
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
pub(crate) struct PhiloxDraws {
    pub(crate) key: [u32; 2],
    pub(crate) step: u32,
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
pub(crate) const BLOCK: usize = 256;

/// What every thread of one evaluation reads.
pub(crate) struct Ctx<'a, D> {
    pub(crate) model: FusedModel,
    pub(crate) x: &'a [f64],
    pub(crate) prev: &'a [f64],
    pub(crate) q: &'a ParamsView<'a>,
    pub(crate) sd: &'a [f64],
    pub(crate) theta_sd: f64,
    pub(crate) draws: usize,
    pub(crate) source: &'a D,
}

/// The threads a step's draws are split over.
#[derive(Clone, Copy)]
pub(crate) enum Workers<'a> {
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
pub(crate) fn evaluate<D: Draws>(
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
pub(crate) fn has_avx2() -> bool {
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
pub(crate) fn work<D: Draws>(ctx: &Ctx<'_, D>, groups: std::ops::Range<usize>) -> (Partial, f64) {
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
pub(crate) unsafe fn work_avx2<D: Draws>(
    ctx: &Ctx<'_, D>,
    groups: std::ops::Range<usize>,
) -> (Partial, f64) {
    work_impl(ctx, groups)
}

/// [`work`] for the baseline target only (for tests).
#[cfg(test)]
pub(crate) fn work_portable<D: Draws>(
    ctx: &Ctx<'_, D>,
    groups: std::ops::Range<usize>,
) -> (Partial, f64) {
    work_impl(ctx, groups)
}

#[inline(always)]
pub(crate) fn work_impl<D: Draws>(
    c: &Ctx<'_, D>,
    groups: std::ops::Range<usize>,
) -> (Partial, f64) {
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
pub(crate) struct RowAcc<'a> {
    pub(crate) eps: &'a [f64],
    pub(crate) mean: &'a [f64],
    pub(crate) sd: &'a [f64],
    pub(crate) x: &'a [f64],
    pub(crate) prev: &'a [f64],
    pub(crate) g_mean: &'a mut [f64],
    pub(crate) g_log_sd: &'a mut [f64],
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
pub(crate) const LANES: usize = 8;

/// Σ of `values`: element i goes to partial sum i mod [`LANES`], then the
/// partial sums are added in order.
#[inline(always)]
pub(crate) fn lane_sum(values: &[f64]) -> f64 {
    lane_sum_of(values, |v| v)
}

/// Σ v² over `values`, in the order of [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_sum_sq(values: &[f64]) -> f64 {
    lane_sum_of(values, |v| v * v)
}

/// Σ f(v) over `values`, in the order of [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_sum_of(values: &[f64], f: impl Fn(f64) -> f64) -> f64 {
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
pub(crate) fn lane_dot(a: &[f64], b: &[f64]) -> f64 {
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

/// Accumulate the gradient of −ELBO into the `.grad` of every parameter of
/// `var` (the caller zeroes them first) and return the ELBO estimate: the
/// inference function's `[N, 2]` rows are computed with autograd and read
/// once, the fused kernel gives ∂ELBO/∂rows and ∂ELBO/∂q(θ), and one
/// backward pass of `−(⟨rows, ∂rows⟩ + μ_θ ∂μ_θ + log s_θ ∂log s_θ)` carries
/// them to every parameter.
#[allow(clippy::too_many_arguments)]
pub(crate) fn torch_backward<D: Draws>(
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

/// (mean, log-sd) of a scalar q(θ).
pub(crate) fn theta_host(var: &Variational) -> Result<(f64, f64)> {
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
