//! The optimisation loop: reparameterised Monte Carlo ELBO gradients and Adam
//! (digest §4.1, §5.2), with an on-device trace, periodic non-finite checks
//! and a final ELBO evaluation on fresh draws.

use std::sync::Mutex;
use std::time::Instant;

use avi_models::{Model, HALF_LN_2PI};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::family::GaussianParams;
use crate::function::Output;
use crate::method::{MethodConfig, ThetaFactor, Variational};
use crate::{InferenceError, Result};

/// How the entropy term `−E_q[log q]` of the ELBO is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entropy {
    /// `−log q` at the same draws as `log p` (the paper's estimator).
    #[default]
    Mc,
    /// The closed-form Gaussian entropy `Σ (log s + ½ + ½ log 2π)`.
    Analytic,
}

/// Floating-point precision of a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// 32-bit floats (default, as in the authors' code for most models).
    #[default]
    F32,
    /// 64-bit floats.
    F64,
}

impl Dtype {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::F64 => Kind::Double,
        }
    }
}

/// Settings of one fit, validated by [`FitOptions::check`] before anything
/// runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitOptions {
    /// Number of Adam steps, at most [`MAX_STEPS`] (10⁹).
    pub steps: usize,
    /// Adam learning rate (β = (0.9, 0.999), ε = 1e-8, no weight decay), in
    /// [[`MIN_LR`], [`MAX_LR`]] = [1e-30, 1e6], and so is `lr` times every
    /// [`FitOptions::lr_schedule`] factor: every rate a fit uses is then a
    /// normal number in f32 and f64, and an Adam step (at most about the
    /// rate per parameter) stays far from overflowing f32.
    pub lr: f64,
    /// Monte Carlo draws per gradient step, in 1..=[`MAX_DRAWS`] (10⁸).
    pub draws: usize,
    /// Seed of libtorch's generator (initialisation and draws).
    pub seed: u64,
    /// Fresh draws for the final ELBO estimate, in 1..=[`MAX_DRAWS`].
    pub eval_draws: usize,
    /// Entropy estimator.
    pub entropy: Entropy,
    /// Precision.
    pub dtype: Dtype,
    /// Read the trace back and test for non-finite values every this many
    /// steps (at most 100, so a divergence is caught within 100 steps).
    pub check_every: usize,
    /// Mini-batch size B (digest §4.4): the likelihood of B observations per
    /// step, scaled by N/B; `None` uses all N. Batches are consecutive slices
    /// of a fixed order (the data order unless `shuffle`).
    pub batch_size: Option<usize>,
    /// Draw a new random order of the observations at every epoch.
    pub shuffle: bool,
    /// Which implementation takes the steps.
    pub engine: Engine,
    /// Learning-rate changes (default none: `lr` throughout, as in the
    /// paper): from step `from` on, the rate is `lr × factor` of the last
    /// entry that has started. Adam's moments carry over. A constant step
    /// leaves Adam at a noise floor over thousands of free factors; a decay
    /// lets F-VI reach its optimum, so that the amortization gap is not
    /// confounded with optimiser noise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_schedule: Vec<LrStep>,
}

/// The largest number of steps a fit takes (10⁹; a day at 0.1 ms per step,
/// and a trace of 24 GB): more is a typo, not an experiment.
pub const MAX_STEPS: usize = 1_000_000_000;

/// The largest learning rate, and learning rate times schedule factor
/// (10⁶): Adam moves a parameter by about the rate per step, so larger rates
/// only scatter the parameters, and 10⁶ leaves f32 far from overflow
/// (libtorch's Adam converts its first step size lr / (1 − β₁) = 10·lr to
/// the parameters' dtype: lr = 3e38 overflowed f32 there and panicked).
pub const MAX_LR: f64 = 1e6;

/// The smallest learning rate, and learning rate times schedule factor
/// (10⁻³⁰): a normal number in f32 (smaller rates round to subnormals or 0
/// in an f32 fit).
pub const MIN_LR: f64 = 1e-30;

/// The largest number of draws per step and of evaluation draws (10⁸,
/// 25,000 times the experiments' largest count, 4,000 evaluation draws):
/// `draws` and `eval_draws` size tensors and host vectors, so they must stay
/// far from overflow; whether a fit's tensors fit in memory is
/// [`crate::check_fit`]'s question.
pub const MAX_DRAWS: usize = 100_000_000;

/// One change of the learning rate ([`FitOptions::lr_schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrStep {
    /// The first (1-based) step taken at the new rate (at least 2).
    pub from: usize,
    /// The new rate as a multiple of [`FitOptions::lr`] (finite, > 0, and
    /// `lr × factor` in [[`MIN_LR`], [`MAX_LR`]]).
    pub factor: f64,
}

/// The implementation of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// libtorch kernels and autograd ([`Trainer`]); every model, method and
    /// device.
    #[default]
    Torch,
    /// The fused engine: analytic per-element gradients instead of
    /// autograd, for the scalar models (linear, nonlinear, saw) with a free
    /// q(θ) and full batches. Same objective and Adam, its own random draws.
    /// On the CPU [`crate::FusedTrainer`] (F-VI, Const, A-VI); on CUDA
    /// [`crate::CudaFviTrainer`] (F-VI: two kernel launches per step, the
    /// draws never stored, blocks captured as CUDA graphs).
    Fused,
    /// The libtorch step of [`Engine::Torch`] (same draws, same objective)
    /// with libtorch's fused Adam kernel and step counts on the device
    /// ([`avi_cuda::FusedAdam`]), so that no step reads the host. On CUDA
    /// the `check_every` steps between two checks are captured once as a
    /// CUDA graph and replayed with one launch ([`GraphTrainer`]); on the
    /// CPU the same steps run without capture. Mini-batches in their fixed
    /// order (no `shuffle`), each block a whole number of epochs; with
    /// monitoring, blocks of gcd(`check_every`, the observer's
    /// [`Observer::monitor_every`]) steps, monitored between replays.
    Graph,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            steps: 5000,
            lr: 0.01,
            draws: 100,
            seed: 1954,
            eval_draws: 1000,
            entropy: Entropy::Mc,
            dtype: Dtype::F32,
            check_every: 100,
            batch_size: None,
            shuffle: false,
            engine: Engine::Torch,
            lr_schedule: Vec::new(),
        }
    }
}

impl FitOptions {
    /// Check every setting; the error names the field. Option-only checks:
    /// what depends on the model and the data is [`crate::check_fit`]'s.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(InferenceError::config(
                "lr",
                format!("{} must be finite and > 0", self.lr),
            ));
        }
        if !(MIN_LR..=MAX_LR).contains(&self.lr) {
            return Err(InferenceError::config(
                "lr",
                format!("{:e} must be in [{MIN_LR:e}, {MAX_LR:e}]", self.lr),
            ));
        }
        if self.steps > MAX_STEPS {
            return Err(InferenceError::config(
                "steps",
                format!(
                    "{} is more than the largest supported, {MAX_STEPS}",
                    self.steps
                ),
            ));
        }
        for (field, value) in [("draws", self.draws), ("eval_draws", self.eval_draws)] {
            if value == 0 {
                return Err(InferenceError::config(field, "must be at least 1"));
            }
            if value > MAX_DRAWS {
                return Err(InferenceError::config(
                    field,
                    format!("{value} is more than the largest supported, {MAX_DRAWS}"),
                ));
            }
        }
        if self.batch_size == Some(0) {
            return Err(InferenceError::config("batch_size", "must be at least 1"));
        }
        if self.check_every == 0 || self.check_every > 100 {
            return Err(InferenceError::config(
                "check_every",
                format!("{} must be in 1..=100", self.check_every),
            ));
        }
        let mut previous = 1;
        for s in &self.lr_schedule {
            if s.from <= previous {
                return Err(InferenceError::config(
                    "lr_schedule",
                    format!(
                        "`from` {} must be at least 2 and larger than the entry before",
                        s.from
                    ),
                ));
            }
            if !(s.factor.is_finite() && s.factor > 0.0) {
                return Err(InferenceError::config(
                    "lr_schedule",
                    format!("factor {} must be finite and > 0", s.factor),
                ));
            }
            let rate = self.lr * s.factor;
            if !(MIN_LR..=MAX_LR).contains(&rate) {
                return Err(InferenceError::config(
                    "lr_schedule",
                    format!(
                        "factor {:e} gives the rate lr × factor = {rate:e}, which must be in \
                         [{MIN_LR:e}, {MAX_LR:e}]",
                        s.factor
                    ),
                ));
            }
            previous = s.from;
        }
        Ok(())
    }

    /// The learning rate from `step` on when the schedule changes it at
    /// that (1-based) step; `None` otherwise.
    pub fn lr_change_at(&self, step: usize) -> Option<f64> {
        self.lr_schedule
            .iter()
            .find(|s| s.from == step)
            .map(|s| self.lr * s.factor)
    }

    /// Steps at which the learning rate changes do not fall inside a block
    /// of `block` steps (engines that replay whole blocks change it between
    /// blocks only).
    fn check_schedule_blocks(&self, block: usize, engine: &str) -> Result<()> {
        match self.lr_schedule.iter().find(|s| (s.from - 1) % block != 0) {
            Some(s) => Err(InferenceError::config(
                "lr_schedule",
                format!(
                    "the {engine} changes the learning rate between blocks of {block} steps: \
                     `from` {} must be 1 + a multiple of {block}",
                    s.from
                ),
            )),
            None => Ok(()),
        }
    }
}

/// Whether a fit finished normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitStatus {
    /// Every step produced finite values.
    Ok,
    /// The ELBO or a parameter became non-finite at this (1-based) step; the
    /// optimisation stopped there. Also given, at the last step, to a run
    /// that finished all its steps but whose final ELBO is not finite.
    Diverged {
        /// The first step whose ELBO estimate (or, failing that, the check
        /// step whose parameters) was not finite; the last step when every
        /// step was finite but the ELBO of the final parameters is not.
        at: usize,
    },
}

/// The ELBO estimate of every step and the wall-clock time at its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// 1-based step numbers.
    pub iteration: Vec<usize>,
    /// The Monte Carlo ELBO estimate of that step, computed before its Adam
    /// update (as the authors record their loss).
    pub elbo: Vec<f64>,
    /// Seconds since the optimisation started, at the end of the step (on
    /// CUDA: when the step was queued; the clock is re-synchronised with the
    /// device at every check).
    pub seconds: Vec<f64>,
}

impl Trace {
    /// Keep the first `steps` steps (a diverged fit keeps the steps up to
    /// the first non-finite one).
    pub(crate) fn truncate(&mut self, steps: usize) {
        self.iteration.truncate(steps);
        self.elbo.truncate(steps);
        self.seconds.truncate(steps);
    }
}

/// Summary of a diagonal Gaussian family on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianSummary {
    /// Means, row-major.
    pub mean: Vec<f64>,
    /// Standard deviations, row-major.
    pub sd: Vec<f64>,
    /// Shape of the arrays (`[D]` or `[N, L]`).
    pub shape: Vec<usize>,
}

/// The result of [`fit`].
#[derive(Debug)]
pub struct Fit {
    /// q(θ), or `None` when θ was fixed.
    pub q_theta: Option<GaussianSummary>,
    /// q(z_n) for every n, as given by the fitted family (Gaussian local
    /// factors; empty arrays for categorical ones).
    pub q_z: GaussianSummary,
    /// For categorical local factors: the `[N, K]` probabilities, row-major.
    pub q_z_probs: Option<Vec<f64>>,
    /// Per-step trace.
    pub trace: Trace,
    /// ELBO at the final parameters from `eval_draws` fresh draws, every
    /// normalising constant included.
    pub elbo: f64,
    /// Monte Carlo standard error of [`Fit::elbo`].
    pub elbo_se: f64,
    /// Steps taken.
    pub iterations: usize,
    /// Wall time of the optimisation loop in seconds.
    pub seconds: f64,
    /// Ok or diverged.
    pub status: FitStatus,
    /// Number of learned scalars.
    pub num_parameters: usize,
    /// The fitted variational parameters (for further work, e.g. F-VI steps
    /// started from an A-VI solution).
    pub variational: Variational,
    /// Why the final ELBO of a fit that finished may not be trusted, in
    /// words (empty when nothing is amiss); see [`elbo_warnings`] for the
    /// bounds. Each names the local factors most out of line.
    pub warnings: Vec<String>,
}

/// The Monte Carlo standard error of a final ELBO is suspicious above
/// `SE_WARN_REL × |ELBO| + SE_WARN_NATS`. Among the 705 fits of the
/// committed results, 20 are above 1 %: 18 are nonlinear fits that never
/// converged (ELBO −10⁵ to −10³⁰, finished with status ok), 2 are the short
/// runs of the quick BNN check (1.5 % and 4.9 %); every other fit is below
/// 0.8 %. 10 nats keep small problems, whose |ELBO| is a few hundred
/// nats, from being flagged for ordinary noise.
pub const SE_WARN_REL: f64 = 0.01;

/// See [`SE_WARN_REL`].
pub const SE_WARN_NATS: f64 = 10.0;

/// A final ELBO below the median of the trace's last
/// [`TRACE_WARN_STEPS`] estimates by more than `TRACE_WARN_SPREADS` times
/// their spread (1.4826 × median absolute deviation, the sd of Gaussian
/// noise) plus [`SE_WARN_REL`] × |median| + [`SE_WARN_NATS`] disagrees with
/// what the optimisation saw: a steady fit's final estimate lies within
/// about one spread/√(steps) of that median (a still-rising fit lies
/// above it), so a shortfall of five spreads is no noise.
pub const TRACE_WARN_SPREADS: f64 = 5.0;

/// The number of last trace steps compared with the final ELBO (see
/// [`TRACE_WARN_SPREADS`]).
pub const TRACE_WARN_STEPS: usize = 50;

/// A final ELBO below `−ELBO_WARN_PER_VALUE` nats per observed value is
/// absurd: a value 141 noise sds from its mean costs 10⁴ nats. In the
/// committed results the BNN's Const fit (−2.5·10⁶ for 10⁴ images of 784
/// pixels) is at 0.3 nats per pixel, the nonlinear fits that converge at
/// about 3 nats per observation, and only the non-converging fits of the
/// nonlinear model on the authors' simulation reach 3·10⁴ (−3.1·10⁸ for
/// N = 10⁴).
pub const ELBO_WARN_PER_VALUE: f64 = 1e4;

/// How many local factors a warning names.
const WARN_FACTORS: usize = 5;

/// The median of non-empty `v` (sorted copy).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = s.len();
    if k % 2 == 1 {
        s[k / 2]
    } else {
        0.5 * (s[k / 2 - 1] + s[k / 2])
    }
}

/// The warnings of a finished fit's final ELBO `elbo` ± `se` (see
/// [`Fit::warnings`]): its standard error is beyond [`SE_WARN_REL`] ×
/// |ELBO| + [`SE_WARN_NATS`]; it is far below the trace's last values
/// ([`TRACE_WARN_SPREADS`]); or it is below −[`ELBO_WARN_PER_VALUE`] nats
/// per observed value (`values` = N·d_x). A non-finite ELBO gives none (the
/// fit's status says it diverged). When there is a warning and `q_z` holds
/// Gaussian factors, a last entry names the factors most out of line: the
/// largest standard deviations (they carry the draws that dominate the
/// estimate) and the means farthest from the median mean.
pub fn elbo_warnings(
    elbo: f64,
    se: f64,
    trace: &Trace,
    values: usize,
    q_z: &GaussianSummary,
) -> Vec<String> {
    let mut out = Vec::new();
    if !elbo.is_finite() {
        return out;
    }
    // NaN (one evaluation draw) says nothing; infinite is beyond any bound.
    if se > SE_WARN_REL * elbo.abs() + SE_WARN_NATS {
        out.push(format!(
            "the final ELBO {elbo:.6e} has a Monte Carlo standard error of {se:.3e}, more than \
             {}% of its size + {SE_WARN_NATS} nats: a few draws dominate the estimate",
            SE_WARN_REL * 100.0
        ));
    }
    let last: Vec<f64> = trace
        .elbo
        .iter()
        .rev()
        .take(TRACE_WARN_STEPS)
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if !last.is_empty() {
        let m = median(&last);
        let deviations: Vec<f64> = last.iter().map(|v| (v - m).abs()).collect();
        let spread = 1.4826 * median(&deviations);
        let bound = TRACE_WARN_SPREADS * spread + SE_WARN_REL * m.abs() + SE_WARN_NATS;
        if elbo < m - bound {
            out.push(format!(
                "the final ELBO {elbo:.6e} is far below the estimates of the last {} steps \
                 (median {m:.6e}, spread {spread:.3e}): the final parameters are worse than \
                 the optimisation saw, or a few evaluation draws dominate",
                last.len()
            ));
        }
    }
    let per_value = elbo / values.max(1) as f64;
    if per_value < -ELBO_WARN_PER_VALUE {
        out.push(format!(
            "the final ELBO {elbo:.6e} is {per_value:.3e} nats per observed value \
             (below −{ELBO_WARN_PER_VALUE:e}): a parameter has run off"
        ));
    }
    if !out.is_empty() {
        if let Some(worst) = worst_factors(q_z) {
            out.push(worst);
        }
    }
    out
}

/// The local factors of a Gaussian `q_z` (`[N, L]`) most out of line, in
/// words: the [`WARN_FACTORS`] largest standard deviations and the means
/// farthest from the median mean (0-based n, the worst of its L
/// coordinates). `None` without Gaussian factors.
fn worst_factors(q_z: &GaussianSummary) -> Option<String> {
    let l = *q_z.shape.get(1)?;
    if l == 0 || q_z.sd.is_empty() || q_z.sd.len() != q_z.mean.len() {
        return None;
    }
    let centre = median(&q_z.mean);
    let rank = |score: &dyn Fn(usize) -> f64| -> Vec<(usize, f64)> {
        let mut per_n: Vec<(usize, f64)> = q_z
            .sd
            .chunks(l)
            .enumerate()
            .map(|(n, _)| {
                let s = (0..l)
                    .map(|j| score(n * l + j))
                    .fold(f64::NEG_INFINITY, f64::max);
                (n, s)
            })
            .collect();
        per_n.sort_by(|a, b| b.1.total_cmp(&a.1));
        per_n.truncate(WARN_FACTORS);
        per_n
    };
    let list = |v: &[(usize, f64)]| {
        v.iter()
            .map(|(n, s)| format!("{n} ({s:.3e})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sds = rank(&|i| q_z.sd[i]);
    let means = rank(&|i| (q_z.mean[i] - centre).abs());
    Some(format!(
        "local factors most out of line (0-based n): largest sd {}; mean farthest from the \
         median mean {centre:.3e}: {} (distance)",
        list(&sds),
        list(&means)
    ))
}

/// Hooks called by [`fit`]; every method has a no-op default.
pub trait Observer {
    /// Called at every check, after `done` of `total` steps, with the last
    /// step's ELBO estimate.
    fn on_check(&mut self, _done: usize, _total: usize, _elbo: f64) {}

    /// Steps between calls of [`Observer::on_monitor`]; 0 (the default)
    /// never calls it.
    fn monitor_every(&self) -> usize {
        0
    }

    /// Called before the first step (`done = 0`) and after every
    /// [`Observer::monitor_every`] steps with the current parameters and the
    /// optimisation's wall time so far. Time spent here is left out of the
    /// trace's clock (monitoring is not part of the algorithm). An error
    /// stops the fit.
    fn on_monitor(&mut self, _done: usize, _seconds: f64, _var: &Variational) -> Result<()> {
        Ok(())
    }
}

/// An [`Observer`] that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// Draw-wise ELBO terms for one step: `elbo[m] = log p(θ_m, z_m, x) −
/// log q(θ_m, z_m)` (or the analytic entropy in place of `−log q`), shape
/// `[M]`. For discrete local latents the expectation over q(z) is exact
/// (enumeration inside [`Model::expected_log_joint`]) and the entropy of q(z)
/// is exact; only θ is drawn.
pub fn elbo_draws(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
) -> Result<Tensor> {
    elbo_draws_batch(model, var, x, draws, entropy, None)
}

/// [`elbo_draws`] with the likelihood restricted to a mini-batch `(indices,
/// scale)` (see [`Model::log_joint_batch`]); `None` uses all observations.
pub fn elbo_draws_batch(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    batch: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    let kind = x.kind();
    let device = x.device();
    let m = draws as i64;
    let (theta, theta_q) = match &var.theta {
        ThetaFactor::Free(q) => {
            let eps = Tensor::randn([m, q.mean.size()[0]], (kind, device));
            (q.sample(&eps), Some((q, eps)))
        }
        ThetaFactor::Fixed(t) => (t.unsqueeze(0).expand([m, t.size()[0]], false), None),
    };
    // −log q(θ) per draw (or its analytic expectation).
    let theta_neg_log_q = theta_q
        .map(|(q, eps)| gaussian_neg_log_q(entropy, &eps, &[1], q.sum_log_sd(), q.numel() as f64));
    let local = match var.output {
        Output::Categorical { .. } => {
            let log_probs = var.local_log_probs();
            let expected = model.expected_log_joint(&theta, &log_probs, x)?;
            let h_z = -(log_probs.exp() * &log_probs).sum(kind);
            expected + h_z
        }
        Output::Gaussian { .. } => {
            let local = var.local_params();
            let eps_z = Tensor::randn([m, var.n as i64, var.local_dim as i64], (kind, device));
            let z = local.sample(&eps_z);
            let log_p = match batch {
                None => model.log_joint(&theta, &z, x)?,
                Some((idx, scale)) => model.log_joint_batch(&theta, &z, x, idx, scale)?,
            };
            let dims = (var.n * var.local_dim) as f64;
            log_p + gaussian_neg_log_q(entropy, &eps_z, &[1, 2], local.sum_log_sd(), dims)
        }
    };
    Ok(match theta_neg_log_q {
        Some(t) => local + t,
        // θ known: the target is p(z, x | θ), so log p(θ) is left out and the
        // ELBO bounds log p(x | θ).
        None => local - model.log_prior(&theta)?,
    })
}

/// −log q per draw of a diagonal Gaussian with `count` dimensions whose
/// Σ log sd is `sum_log_sd` (broadcast over the draws). `Entropy::Mc`: at
/// the draws whose standard normals `eps` are summed over `dims`,
/// −log q = Σ log s + ½ Σ ε² + (count/2) log 2π (ε = (v − m)/s);
/// `Entropy::Analytic`: its expectation, Σ log s + count (½ + ½ log 2π).
pub(crate) fn gaussian_neg_log_q(
    entropy: Entropy,
    eps: &Tensor,
    dims: &[i64],
    sum_log_sd: Tensor,
    count: f64,
) -> Tensor {
    match entropy {
        Entropy::Analytic => sum_log_sd + count * (0.5 + HALF_LN_2PI),
        Entropy::Mc => {
            eps.square()
                .sum_dim_intlist(dims, false, eps.kind())
                .multiply_scalar(0.5)
                + sum_log_sd
                + count * HALF_LN_2PI
        }
    }
}

/// Estimate the ELBO of the current parameters from `draws` fresh draws
/// without gradients, in chunks that bound memory. Returns (mean, standard
/// error).
pub fn evaluate_elbo(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
) -> Result<(f64, f64)> {
    let per_draw = match var.output {
        Output::Gaussian { .. } => (var.n * var.local_dim).max(1),
        Output::Categorical { .. } => 1,
    };
    let chunk = (crate::limits::EVAL_CHUNK_ELEMENTS / per_draw).clamp(1, draws);
    let mut values = Vec::with_capacity(draws);
    tch::no_grad(|| -> Result<()> {
        let mut left = draws;
        while left > 0 {
            let m = left.min(chunk);
            let e = elbo_draws(model, var, x, m, entropy)?;
            values.extend(Vec::<f64>::try_from(
                e.to_kind(Kind::Double).to_device(Device::Cpu),
            )?);
            left -= m;
        }
        Ok(())
    })?;
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    Ok((mean, standard_error(&values, mean)))
}

/// The standard error `sd / √n` of the mean `mean` of `values` (NaN for
/// fewer than two), computed on deviations scaled by the largest one, so
/// that values of 10¹⁷⁴ give a finite error instead of an overflowing sum
/// of squares.
fn standard_error(values: &[f64], mean: f64) -> f64 {
    if values.len() < 2 {
        return f64::NAN;
    }
    let n = values.len() as f64;
    let scale = values.iter().map(|v| (v - mean).abs()).fold(0.0, f64::max);
    if scale == 0.0 || !scale.is_finite() {
        return scale;
    }
    let ss: f64 = values.iter().map(|v| ((v - mean) / scale).powi(2)).sum();
    scale * (ss / (n - 1.0) / n).sqrt()
}

/// A tensor's values as f64 on the host, flattened in row-major order
/// (one device read; for reports and checks, never inside a training loop).
pub fn host_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.detach()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .contiguous()
            .view([-1]),
    )?)
}

fn summarize(p: &GaussianParams) -> Result<GaussianSummary> {
    Ok(GaussianSummary {
        mean: host_vec(&p.mean)?,
        sd: host_vec(&p.log_sd.exp())?,
        shape: p.mean.size().iter().map(|&s| s as usize).collect(),
    })
}

pub(crate) fn params_finite(vs: &nn::VarStore) -> bool {
    let vars = vs.trainable_variables();
    if vars.is_empty() {
        return true;
    }
    let bad: Vec<Tensor> = vars
        .iter()
        .map(|v| {
            v.detach()
                .isfinite()
                .logical_not()
                .any()
                .to_kind(Kind::Int64)
        })
        .collect();
    Tensor::stack(&bad, 0).sum(Kind::Int64).int64_value(&[]) == 0
}

/// libtorch has one global random generator; fits hold this lock while they
/// draw from it, so that concurrent fits in one process stay reproducible
/// (they run one after the other).
static GENERATOR: Mutex<()> = Mutex::new(());

/// Hold libtorch's process-wide random generator. [`fit`] holds it for a
/// whole fit; hold it while driving a [`Trainer`], [`GraphTrainer`] or
/// [`crate::CudaFviTrainer`] directly in a thread beside other fits, so that
/// every run stays reproducible from its seed (their constructors seed the
/// generator). It also keeps a CUDA graph capture (CUDA's global capture
/// mode) from meeting another fit's synchronising CUDA calls. Not
/// re-entrant: do not call [`fit`] while holding it.
pub fn generator_guard() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adam as tch binds it (host step count) or libtorch's fused kernel with
/// device step counts ([`Engine::Graph`]).
enum Optim {
    Torch(nn::Optimizer),
    Fused(avi_cuda::FusedAdam),
}

impl Optim {
    fn new(var: &Variational, opts: &FitOptions) -> Result<Self> {
        Ok(match opts.engine {
            Engine::Graph => Self::Fused(avi_cuda::FusedAdam::new(
                var.vs.trainable_variables(),
                opts.lr,
            )?),
            _ => Self::Torch(nn::Adam::default().build(&var.vs, opts.lr)?),
        })
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Torch(o) => o.set_lr(lr),
            Self::Fused(o) => o.set_lr(lr),
        }
    }

    /// Gradients of `loss`, then one Adam step.
    fn minimise(&mut self, loss: &Tensor) -> Result<()> {
        match self {
            Self::Torch(o) => {
                o.zero_grad();
                loss.backward();
                o.step();
            }
            Self::Fused(o) => {
                o.zero_grad();
                loss.backward();
                o.step()?;
            }
        }
        Ok(())
    }
}

/// One optimisation problem: a model, its data on the device, the
/// variational parameters and their Adam state. [`Trainer::step`] performs
/// one iteration; [`fit`] drives it with checks and a trace.
pub struct Trainer<'a> {
    model: &'a dyn Model,
    x: Tensor,
    var: Variational,
    optimizer: Optim,
    opts: FitOptions,
    /// Mini-batching: the order of the observations and the next position.
    order: Option<Tensor>,
    position: i64,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model.name())
            .field("var", &self.var)
            .field("opts", &self.opts)
            .finish()
    }
}

impl<'a> Trainer<'a> {
    /// Validate the options and data, seed libtorch's generator with
    /// `opts.seed` and initialise the variational parameters of `method`.
    pub fn new(
        model: &'a dyn Model,
        x: &Tensor,
        method: &MethodConfig,
        fixed_theta: Option<&[f64]>,
        opts: &FitOptions,
        device: Device,
    ) -> Result<Self> {
        check_data_size(model, x, method, opts, device)?;
        let kind = opts.dtype.kind();
        let x = x.to_device(device).to_kind(kind);
        model.check_data(&x)?;
        if opts.batch_size.is_some() && !model.supports_batches() {
            return Err(InferenceError::config(
                "batch_size",
                format!("the {} model does not support mini-batches", model.name()),
            ));
        }
        tch::manual_seed(opts.seed as i64);
        let var = Variational::for_model(method, model, &x, fixed_theta, kind, device)?;
        let optimizer = Optim::new(&var, opts)?;
        let n = x.size()[0];
        let order = opts.batch_size.map(|_| {
            if opts.shuffle {
                Tensor::randperm(n, (Kind::Int64, device))
            } else {
                Tensor::arange(n, (Kind::Int64, device))
            }
        });
        Ok(Self {
            model,
            x,
            var,
            optimizer,
            opts: opts.clone(),
            order,
            position: 0,
        })
    }

    /// Continue from given variational parameters (for instance
    /// [`Variational::to_free`] of a fitted A-VI solution) with a fresh Adam
    /// state; `x` must already be on the parameters' device, in `opts.dtype`.
    /// The generator is not re-seeded: the draws continue its stream.
    pub fn from_variational(
        model: &'a dyn Model,
        x: &Tensor,
        var: Variational,
        opts: &FitOptions,
    ) -> Result<Self> {
        opts.check()?;
        if opts.batch_size.is_some() {
            return Err(InferenceError::config(
                "batch_size",
                "continuing from given parameters supports full batches only",
            ));
        }
        let optimizer = Optim::new(&var, opts)?;
        Ok(Self {
            model,
            x: x.shallow_clone(),
            var,
            optimizer,
            opts: opts.clone(),
            order: None,
            position: 0,
        })
    }

    /// One iteration: draw, estimate the ELBO, back-propagate, Adam step.
    /// Returns the ELBO estimate (computed before the update) as a detached
    /// scalar on the device; nothing is read back to the host.
    pub fn step(&mut self) -> Result<Tensor> {
        let batch = match (&self.order, self.opts.batch_size) {
            (Some(order), Some(b)) => {
                let n = order.size()[0];
                let len = (b as i64).min(n - self.position);
                let idx = order.narrow(0, self.position, len);
                self.position += len;
                if self.position >= n {
                    self.position = 0;
                    if self.opts.shuffle {
                        self.order = Some(Tensor::randperm(n, (Kind::Int64, order.device())));
                    }
                }
                Some((idx, n as f64 / len as f64))
            }
            _ => None,
        };
        let elbo = elbo_draws_batch(
            self.model,
            &self.var,
            &self.x,
            self.opts.draws,
            self.opts.entropy,
            batch.as_ref().map(|(i, s)| (i, *s)),
        )?
        .mean(self.opts.dtype.kind());
        self.optimizer.minimise(&elbo.neg())?;
        Ok(elbo.detach())
    }

    /// Set the learning rate of the following steps (Adam's moments carry
    /// over).
    pub fn set_lr(&mut self, lr: f64) {
        self.optimizer.set_lr(lr);
    }

    /// The current variational parameters.
    pub fn variational(&self) -> &Variational {
        &self.var
    }

    /// Take the variational parameters out of the trainer.
    pub fn into_variational(self) -> Variational {
        self.var
    }

    /// The data on the device, in the fit's dtype.
    pub fn data(&self) -> &Tensor {
        &self.x
    }
}

/// Runs a [`Trainer`] of [`Engine::Graph`] in blocks of a fixed number of
/// steps, each step's ELBO estimate written into a device buffer. On CUDA
/// the first block runs eagerly on the graph's own stream (warm-up: libtorch
/// creates its handles and caches there), the second is captured as one CUDA
/// graph, and every later block is one replay of it; nothing is read back to
/// the host inside a block. On the CPU every block runs eagerly. While a
/// block is captured, no other thread of the process may make a
/// synchronising CUDA call (CUDA's global capture mode; see
/// [`generator_guard`]).
pub struct GraphTrainer<'a> {
    trainer: Trainer<'a>,
    block: usize,
    buf: Tensor,
    graph: BlockGraph,
}

/// Blocks of steps as a CUDA graph: the first block runs eagerly on the
/// graph's own stream (warm-up: libtorch creates its handles and caches
/// there), the second is captured, every later one is one replay. Without
/// a graph (the CPU, or capture turned off) every block runs eagerly.
pub(crate) struct BlockGraph {
    graph: Option<avi_cuda::CudaGraph>,
    captured: bool,
}

impl BlockGraph {
    /// A graph on CUDA devices, none elsewhere.
    pub(crate) fn new(device: Device) -> Result<Self> {
        let graph = match device {
            Device::Cuda(_) => Some(avi_cuda::CudaGraph::new(device)?),
            _ => None,
        };
        Ok(Self {
            graph,
            captured: false,
        })
    }

    /// Never capture.
    pub(crate) fn disable(&mut self) {
        self.graph = None;
    }

    pub(crate) fn captured(&self) -> bool {
        self.captured
    }

    /// Whether blocks may be captured (a CUDA device, capture not turned
    /// off).
    pub(crate) fn enabled(&self) -> bool {
        self.graph.is_some()
    }

    /// One block: `run` queues its steps, which write their ELBO
    /// estimates into `buf`; returns a copy of `buf`.
    pub(crate) fn run(
        &mut self,
        device: Device,
        buf: &Tensor,
        mut run: impl FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let Some(g) = &mut self.graph else {
            run()?;
            return Ok(buf.copy());
        };
        if self.captured {
            g.replay()?;
            return Ok(buf.copy());
        }
        // Warm-up on the graph's stream, after the parameters (made on the
        // default stream) are complete.
        tch::Cuda::synchronize(device_index(device));
        g.enter_stream()?;
        let warm = run().map(|()| buf.copy());
        g.sync_stream()?;
        g.leave_stream()?;
        let out = warm?;
        // Capture the next block; it runs at the first replay.
        g.capture(&mut run)??;
        self.captured = true;
        Ok(out)
    }
}

impl std::fmt::Debug for GraphTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTrainer")
            .field("trainer", &self.trainer)
            .field("block", &self.block)
            .field("captured", &self.graph.captured())
            .finish()
    }
}

impl<'a> GraphTrainer<'a> {
    /// Blocks of `block` steps of `trainer`, which must use
    /// [`Engine::Graph`] (device-side Adam). With mini-batches the order
    /// must be fixed (no `shuffle`) and a block must hold a whole number of
    /// epochs (⌈N / B⌉ steps each): a captured block reads the batches at
    /// the positions it was captured with, so every replay must start where
    /// the capture did.
    pub fn new(trainer: Trainer<'a>, block: usize) -> Result<Self> {
        if trainer.opts.engine != Engine::Graph {
            return Err(InferenceError::config(
                "engine",
                "a GraphTrainer needs a trainer built with engine \"graph\"",
            ));
        }
        if block == 0 {
            return Err(InferenceError::config("check_every", "must be at least 1"));
        }
        if let Some(b) = trainer.opts.batch_size {
            if trainer.opts.shuffle {
                return Err(InferenceError::config(
                    "shuffle",
                    "the graph engine replays a fixed batch order: mini-batches without shuffling only",
                ));
            }
            let epoch = (trainer.x.size()[0] as usize).div_ceil(b);
            if block % epoch != 0 {
                return Err(InferenceError::config(
                    "check_every",
                    format!(
                        "the graph engine replays whole epochs: its blocks of {block} steps \
                         (check_every, or its gcd with the monitoring interval) are not a \
                         multiple of the {epoch} mini-batches of an epoch"
                    ),
                ));
            }
        }
        let device = trainer.x.device();
        let buf = Tensor::zeros([block as i64], (trainer.opts.dtype.kind(), device));
        Ok(Self {
            trainer,
            block,
            buf,
            graph: BlockGraph::new(device)?,
        })
    }

    /// Never capture: every block runs eagerly, with the same kernels (the
    /// reference that a captured run is compared with).
    pub fn without_capture(mut self) -> Self {
        self.graph.disable();
        self
    }

    /// Steps per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the block has been captured as a CUDA graph (CUDA only).
    pub fn captured(&self) -> bool {
        self.graph.captured()
    }

    fn eager_block(trainer: &mut Trainer<'_>, buf: &Tensor, block: usize) -> Result<()> {
        for i in 0..block {
            let elbo = trainer.step()?;
            buf.narrow(0, i as i64, 1).copy_(&elbo.view([1]));
        }
        Ok(())
    }

    /// Run one block of steps; returns their ELBO estimates as a `[block]`
    /// tensor on the device (a copy, not overwritten by later blocks).
    pub fn step_block(&mut self) -> Result<Tensor> {
        let Self {
            trainer,
            block,
            buf,
            graph,
        } = self;
        let device = trainer.x.device();
        graph.run(device, buf, || Self::eager_block(trainer, buf, *block))
    }

    /// One step outside any graph (for a last, shorter block).
    pub fn step(&mut self) -> Result<Tensor> {
        self.trainer.step()
    }

    /// Set the learning rate of the following blocks: a captured graph
    /// keeps the rate it was captured with, so the next block warms up and
    /// is captured anew.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.trainer.set_lr(lr);
        let device = self.trainer.x.device();
        let capture = self.graph.enabled();
        self.graph = BlockGraph::new(device)?;
        if !capture {
            self.graph.disable();
        }
        Ok(())
    }

    /// The trainer (its parameters and data).
    pub fn trainer(&self) -> &Trainer<'a> {
        &self.trainer
    }

    /// Take the trainer back.
    pub fn into_trainer(self) -> Trainer<'a> {
        self.trainer
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

/// [`crate::check_fit_within`] for the data `x` (N = its first dimension)
/// against the memory available on `device`, and
/// [`crate::check_representable`] for its values; data without a first
/// dimension go to the model's own check.
pub(crate) fn check_data_size(
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    opts: &FitOptions,
    device: Device,
) -> Result<()> {
    let Some(&n) = x.size().first() else {
        model.check_data(x)?;
        return Err(InferenceError::config(
            "data",
            "the data have no observations",
        ));
    };
    let n = usize::try_from(n).unwrap_or(0);
    crate::limits::check_fit_within(
        model,
        n,
        method,
        opts,
        crate::limits::available_memory(device),
    )?;
    crate::limits::check_representable(x, opts.dtype)
}

/// Fit `method` to data `x` under `model` by stochastic-gradient VI.
///
/// `x` may live on any device; it is moved to `device` and converted to the
/// fit's dtype. Every size is checked first, before anything is allocated
/// ([`crate::check_fit`], against the memory available on `device`). Seeds
/// libtorch's global generator with `opts.seed`; fits in one process are
/// serialised on a lock so that each is reproducible from its seed whatever
/// runs beside it. Non-finite ELBO estimates or parameters stop the fit with
/// [`FitStatus::Diverged`]; the result is still returned. A final ELBO that
/// finished but looks unreliable is described in [`Fit::warnings`].
pub fn fit(
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    fixed_theta: Option<&[f64]>,
    opts: &FitOptions,
    device: Device,
    observer: &mut dyn Observer,
) -> Result<Fit> {
    check_data_size(model, x, method, opts, device)?;
    let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    if opts.engine == Engine::Fused {
        return fit_fused(model, x, method, fixed_theta, opts, device, observer);
    }
    let trainer = Trainer::new(model, x, method, fixed_theta, opts, device)?;
    if opts.engine == Engine::Graph {
        // Monitoring happens between blocks: a block must end at every
        // monitoring step and at every check.
        let block = match observer.monitor_every() {
            0 => opts.check_every,
            every => gcd(opts.check_every, every),
        };
        opts.check_schedule_blocks(block, "graph engine")?;
        return fit_graph(model, GraphTrainer::new(trainer, block)?, opts, observer);
    }
    let mut trainer = trainer;
    let mut trace = Trace::default();
    let mut status = FitStatus::Ok;
    let mut block: Vec<Tensor> = Vec::with_capacity(opts.check_every);
    let every = observer.monitor_every();
    if every > 0 {
        observer.on_monitor(0, 0.0, &trainer.var)?;
    }
    let mut paused = std::time::Duration::ZERO;
    let start = Instant::now();
    let clock = |paused: std::time::Duration| (start.elapsed() - paused).as_secs_f64();
    for step in 1..=opts.steps {
        if let Some(lr) = opts.lr_change_at(step) {
            trainer.set_lr(lr);
        }
        block.push(trainer.step()?);
        trace.seconds.push(clock(paused));
        if block.len() == opts.check_every || step == opts.steps {
            let values = Vec::<f64>::try_from(
                Tensor::stack(&block, 0)
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu),
            )?;
            block.clear();
            let first = step + 1 - values.len();
            let bad = values.iter().position(|v| !v.is_finite());
            trace.iteration.extend(first..=step);
            trace.elbo.extend(&values);
            if let Some(i) = bad {
                status = FitStatus::Diverged { at: first + i };
            } else if !params_finite(&trainer.var.vs) {
                status = FitStatus::Diverged { at: step };
            }
            // Re-anchor the last time stamp now that the device has caught up.
            if let Some(t) = trace.seconds.last_mut() {
                *t = clock(paused);
            }
            observer.on_check(step, opts.steps, *values.last().unwrap_or(&f64::NAN));
            if let FitStatus::Diverged { at } = status {
                trace.truncate(at);
                break;
            }
        }
        if every > 0 && step % every == 0 {
            let now = clock(paused);
            let t0 = Instant::now();
            observer.on_monitor(step, now, &trainer.var)?;
            paused += t0.elapsed();
        }
    }
    let seconds = clock(paused);
    let Trainer { var, x, .. } = trainer;
    finish(model, var, &x, trace, status, seconds, opts)
}

/// A trainer that runs whole blocks of steps on its device
/// ([`GraphTrainer`], [`crate::CudaFviTrainer`]).
trait BlockRunner {
    fn block(&self) -> usize;
    /// One block; its ELBO estimates on the device.
    fn step_block(&mut self) -> Result<Tensor>;
    /// One step outside a graph; its ELBO estimate on the device.
    fn step(&mut self) -> Result<Tensor>;
    fn params_finite(&self) -> bool;
    /// The current parameters, for monitoring (`None`: not monitorable).
    fn variational(&self) -> Option<&Variational> {
        None
    }
    /// Set the learning rate of the following steps.
    fn set_lr(&mut self, lr: f64) -> Result<()>;
}

impl BlockRunner for GraphTrainer<'_> {
    fn block(&self) -> usize {
        self.block
    }
    fn step_block(&mut self) -> Result<Tensor> {
        GraphTrainer::step_block(self)
    }
    fn step(&mut self) -> Result<Tensor> {
        GraphTrainer::step(self)
    }
    fn params_finite(&self) -> bool {
        params_finite(&self.trainer.var.vs)
    }
    fn variational(&self) -> Option<&Variational> {
        Some(&self.trainer.var)
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        GraphTrainer::set_lr(self, lr)
    }
}

impl BlockRunner for crate::CudaFviTrainer {
    fn block(&self) -> usize {
        crate::CudaFviTrainer::block(self)
    }
    fn step_block(&mut self) -> Result<Tensor> {
        crate::CudaFviTrainer::step_block(self)
    }
    fn step(&mut self) -> Result<Tensor> {
        crate::CudaFviTrainer::step(self)
    }
    fn params_finite(&self) -> bool {
        crate::CudaFviTrainer::params_finite(self)
    }
    fn set_lr(&mut self, _lr: f64) -> Result<()> {
        // fit_fused refuses a schedule on CUDA before the run starts.
        Err(InferenceError::config(
            "lr_schedule",
            "the fused CUDA kernels take one learning rate",
        ))
    }
}

/// The loop of the graph engine and the CUDA fused engine: whole blocks of
/// steps (one graph replay each on CUDA), the last shorter block step by
/// step, and the torch engine's checks: every ELBO estimate, and the
/// parameters every `check_every` steps and at the end. A block's time
/// stamps are interpolated between the host clock at the ends of the blocks
/// (each read waits for the device). With monitoring (blocks end at every
/// monitoring step), [`Observer::on_monitor`] runs between blocks, off the
/// clock, as in the torch engine's loop. Returns the trace, the status and
/// the wall time.
fn run_blocks(
    runner: &mut dyn BlockRunner,
    opts: &FitOptions,
    observer: &mut dyn Observer,
) -> Result<(Trace, FitStatus, f64)> {
    let mut trace = Trace::default();
    let mut status = FitStatus::Ok;
    let block = runner.block();
    let every = observer.monitor_every();
    if every > 0 {
        let Some(var) = runner.variational() else {
            return Err(InferenceError::config(
                "engine",
                "this engine has no monitoring hook",
            ));
        };
        if every % block != 0 {
            return Err(InferenceError::config(
                "check_every",
                format!("blocks of {block} steps do not end at every monitoring step ({every})"),
            ));
        }
        observer.on_monitor(0, 0.0, var)?;
    }
    let mut paused = std::time::Duration::ZERO;
    let start = Instant::now();
    let clock = |paused: std::time::Duration| (start.elapsed() - paused).as_secs_f64();
    let mut done = 0;
    let mut last_time = 0.0;
    while done < opts.steps {
        let len = block.min(opts.steps - done);
        let values = if len == block {
            if let Some(lr) = opts.lr_change_at(done + 1) {
                runner.set_lr(lr)?;
            }
            runner.step_block()?
        } else {
            let steps = (0..len)
                .map(|i| {
                    if let Some(lr) = opts.lr_change_at(done + 1 + i) {
                        runner.set_lr(lr)?;
                    }
                    runner.step().map(|t| t.view([-1]))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&steps, 0)
        };
        let values = Vec::<f64>::try_from(values.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let now = clock(paused);
        let first = done + 1;
        done += len;
        let seconds: Vec<f64> = (1..=len)
            .map(|i| last_time + (now - last_time) * i as f64 / len as f64)
            .collect();
        last_time = now;
        let check = done % opts.check_every == 0 || done == opts.steps;
        let diverged = record_block(
            &mut trace,
            &mut status,
            first,
            &values,
            &seconds,
            !check || runner.params_finite(),
        );
        observer.on_check(done, opts.steps, *values.last().unwrap_or(&f64::NAN));
        if diverged {
            break;
        }
        if every > 0 && done % every == 0 {
            if let Some(var) = runner.variational() {
                let t0 = Instant::now();
                observer.on_monitor(done, now, var)?;
                paused += t0.elapsed();
            }
        }
    }
    Ok((trace, status, clock(paused)))
}

/// Appends the steps `first ..= first + values.len() − 1` (ELBO estimates
/// `values`, clock `seconds`) to `trace`, and marks the run diverged at the
/// first non-finite estimate, or at the block's last step when
/// `params_finite` is false; a diverged trace is truncated there. Returns
/// whether the run has diverged (the engines' one check, shared by
/// [`fit`]'s block runners and [`crate::fit_batched`]).
pub(crate) fn record_block(
    trace: &mut Trace,
    status: &mut FitStatus,
    first: usize,
    values: &[f64],
    seconds: &[f64],
    params_finite: bool,
) -> bool {
    let last = first + values.len().saturating_sub(1);
    trace.iteration.extend(first..first + values.len());
    trace.elbo.extend(values);
    trace.seconds.extend(seconds);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        *status = FitStatus::Diverged { at: first + i };
    } else if !params_finite {
        *status = FitStatus::Diverged { at: last };
    }
    if let FitStatus::Diverged { at } = *status {
        trace.truncate(at);
        true
    } else {
        false
    }
}

/// [`fit`] with the graph engine.
fn fit_graph(
    model: &dyn Model,
    mut runner: GraphTrainer<'_>,
    opts: &FitOptions,
    observer: &mut dyn Observer,
) -> Result<Fit> {
    let (trace, status, seconds) = run_blocks(&mut runner, opts, observer)?;
    let Trainer { var, x, .. } = runner.into_trainer();
    finish(model, var, &x, trace, status, seconds, opts)
}

/// The status of a fit whose steps ended with `status` and whose final
/// parameters evaluate to `elbo`: a run whose every step estimate stayed
/// finite but whose final ELBO does not (an estimate of −10⁴⁰ that
/// overflows with more draws) has diverged too, at its last step, rather
/// than finished with no result.
fn final_status(status: FitStatus, elbo: f64, steps: usize) -> FitStatus {
    match status {
        FitStatus::Ok if !elbo.is_finite() => FitStatus::Diverged { at: steps },
        s => s,
    }
}

/// Evaluate and summarise fitted parameters.
pub(crate) fn finish(
    model: &dyn Model,
    var: Variational,
    x: &Tensor,
    trace: Trace,
    status: FitStatus,
    seconds: f64,
    opts: &FitOptions,
) -> Result<Fit> {
    let iterations = match status {
        FitStatus::Ok => opts.steps,
        FitStatus::Diverged { at } => at,
    };
    let (elbo, elbo_se) = evaluate_elbo(model, &var, x, opts.eval_draws, opts.entropy)?;
    let status = final_status(status, elbo, opts.steps);
    let q_theta = match &var.theta {
        ThetaFactor::Free(q) => Some(summarize(q)?),
        ThetaFactor::Fixed(_) => None,
    };
    let (q_z, q_z_probs) = match var.output {
        Output::Gaussian { .. } => (summarize(&var.local_params().detach())?, None),
        Output::Categorical { .. } => (
            GaussianSummary {
                mean: vec![],
                sd: vec![],
                shape: vec![var.n, 0],
            },
            Some(host_vec(&var.local_log_probs().exp())?),
        ),
    };
    let warnings = match status {
        FitStatus::Ok => elbo_warnings(elbo, elbo_se, &trace, x.numel(), &q_z),
        FitStatus::Diverged { .. } => Vec::new(),
    };
    Ok(Fit {
        q_theta,
        q_z,
        q_z_probs,
        trace,
        elbo,
        elbo_se,
        iterations,
        seconds,
        status,
        num_parameters: var.num_parameters(),
        variational: var,
        warnings,
    })
}

/// [`fit`] with the fused engine (the caller holds the generator lock).
fn fit_fused(
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    fixed_theta: Option<&[f64]>,
    opts: &FitOptions,
    device: Device,
    observer: &mut dyn Observer,
) -> Result<Fit> {
    let Some(fused) = crate::forms::fused_form(model) else {
        return Err(InferenceError::config(
            "engine",
            format!(
                "the fused engine covers the linear, nonlinear and saw models, not {}",
                model.name()
            ),
        ));
    };
    if fixed_theta.is_some() {
        return Err(InferenceError::config(
            "engine",
            "the fused engine needs a free q(θ) (no fixed_theta)",
        ));
    }
    if observer.monitor_every() > 0 {
        return Err(InferenceError::config(
            "engine",
            "the fused engine has no monitoring hook",
        ));
    }
    let host = host_vec(x)?;
    if device.is_cuda() {
        if !opts.lr_schedule.is_empty() {
            return Err(InferenceError::config(
                "lr_schedule",
                "the fused CUDA kernels take one learning rate (use the graph engine)",
            ));
        }
        let mut runner =
            crate::CudaFviTrainer::new(&fused, &host, method, opts, device, opts.check_every)?;
        let (trace, status, seconds) = run_blocks(&mut runner, opts, observer)?;
        let var = runner.into_variational()?;
        let x = x.to_device(device).to_kind(opts.dtype.kind());
        return finish(model, var, &x, trace, status, seconds, opts);
    }
    // libtorch's thread count, but no more threads than blocks of
    // FUSED_WORK_PER_THREAD elements (N × draws): below that a second thread
    // does not pay for its wake-up and the final sums (saw, N = 1,000, 100
    // draws, 2-core VM: 0.29–0.40 ms per step on 2 pooled threads, 0.30–0.40
    // on 1; linear, N = 10⁴: 2.7–2.9 vs 3.5–3.9).
    const FUSED_WORK_PER_THREAD: usize = 250_000;
    let work = host.len().saturating_mul(opts.draws);
    let threads = usize::try_from(tch::get_num_threads())
        .unwrap_or(1)
        .clamp(1, (work / FUSED_WORK_PER_THREAD).max(1));
    let mut trainer =
        crate::FusedTrainer::new(&fused, &host, method, opts, device)?.with_threads(threads);
    let mut trace = Trace::default();
    let mut status = FitStatus::Ok;
    let start = Instant::now();
    for step in 1..=opts.steps {
        if let Some(lr) = opts.lr_change_at(step) {
            trainer.set_lr(lr);
        }
        let elbo = trainer.step()?;
        trace.iteration.push(step);
        trace.elbo.push(elbo);
        trace.seconds.push(start.elapsed().as_secs_f64());
        if !elbo.is_finite() {
            status = FitStatus::Diverged { at: step };
        }
        if step % opts.check_every == 0 || step == opts.steps || status != FitStatus::Ok {
            if status == FitStatus::Ok && !trainer.params_finite() {
                status = FitStatus::Diverged { at: step };
            }
            observer.on_check(step, opts.steps, elbo);
            if let FitStatus::Diverged { at } = status {
                trace.truncate(at);
                break;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let var = trainer.into_variational()?;
    let x = x.to_device(device).to_kind(opts.dtype.kind());
    finish(model, var, &x, trace, status, seconds, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(opts: &FitOptions) -> String {
        match opts.check() {
            Err(InferenceError::InvalidConfig { field, reason }) => {
                eprintln!("{field}: {reason}");
                field.to_string()
            }
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    /// The learning rate, every rate of its schedule, the step count and
    /// the draw counts are bounded (before: lr 3e38 passed and panicked in
    /// the fit, 2³² + 1 steps ran "forever", draw counts near 2⁶⁴
    /// overflowed a capacity); the bounds themselves are accepted.
    #[test]
    fn options_are_bounded() {
        let ok = FitOptions::default();
        assert!(ok.check().is_ok());
        for lr in [3e38, 1.0000001e6, 1e-31, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(field_of(&FitOptions { lr, ..ok.clone() }), "lr", "{lr}");
        }
        for lr in [MAX_LR, MIN_LR] {
            assert!(FitOptions { lr, ..ok.clone() }.check().is_ok());
        }
        let schedule = |lr: f64, factor: f64| FitOptions {
            lr,
            lr_schedule: vec![LrStep { from: 10, factor }],
            ..ok.clone()
        };
        assert_eq!(field_of(&schedule(1.0, 3e38)), "lr_schedule");
        assert_eq!(field_of(&schedule(1e3, 1e4)), "lr_schedule");
        assert_eq!(field_of(&schedule(1e-20, 1e-20)), "lr_schedule");
        assert!(schedule(1e3, 1e3).check().is_ok());
        assert_eq!(
            field_of(&FitOptions {
                steps: 4_294_967_297,
                ..ok.clone()
            }),
            "steps"
        );
        assert!(FitOptions {
            steps: MAX_STEPS,
            ..ok.clone()
        }
        .check()
        .is_ok());
        for draws in [0, MAX_DRAWS + 1, 1 << 32, usize::MAX] {
            assert_eq!(
                field_of(&FitOptions {
                    draws,
                    ..ok.clone()
                }),
                "draws"
            );
            assert_eq!(
                field_of(&FitOptions {
                    eval_draws: draws,
                    ..ok.clone()
                }),
                "eval_draws"
            );
        }
        assert_eq!(
            field_of(&FitOptions {
                batch_size: Some(0),
                ..ok.clone()
            }),
            "batch_size"
        );
    }

    /// Values that JSON cannot give a count (negative, fractional) are
    /// refused when the options are read.
    #[test]
    fn negative_counts_do_not_parse() {
        let text = serde_json::to_string(&FitOptions::default()).unwrap();
        for (from, to) in [
            ("\"draws\":100", "\"draws\":-1"),
            ("\"steps\":5000", "\"steps\":-5000"),
            ("\"eval_draws\":1000", "\"eval_draws\":1e3"),
        ] {
            assert!(text.contains(from), "{text}");
            let bad = text.replace(from, to);
            assert!(serde_json::from_str::<FitOptions>(&bad).is_err(), "{bad}");
        }
    }

    fn summary(mean: Vec<f64>, sd: Vec<f64>) -> GaussianSummary {
        let n = mean.len();
        GaussianSummary {
            mean,
            sd,
            shape: vec![n, 1],
        }
    }

    fn trace(values: &[f64]) -> Trace {
        Trace {
            iteration: (1..=values.len()).collect(),
            elbo: values.to_vec(),
            seconds: vec![0.0; values.len()],
        }
    }

    /// Each warning fires on a constructed case beyond its bound and not
    /// just inside it; the worst factors are named.
    #[test]
    fn elbo_warnings_fire_beyond_their_bounds() {
        let mut mean = vec![0.1; 40];
        let mut sd = vec![0.5; 40];
        mean[7] = -4e3;
        sd[31] = 2e4;
        let q = summary(mean, sd);
        // A steady trace around −1,000 (spread ≈ 1.48 from ±1 noise).
        let steady: Vec<f64> = (0..200)
            .map(|i| -1000.0 + if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let t = trace(&steady);
        // Nothing: the final ELBO where the trace is, a small error.
        assert!(elbo_warnings(-1000.2, 0.5, &t, 40, &q).is_empty());
        // Standard error: bound 0.01 × 1000 + 10 = 20.
        assert!(elbo_warnings(-1000.0, 19.9, &t, 40, &q).is_empty());
        let w = elbo_warnings(-1000.0, 20.1, &t, 40, &q);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("standard error"), "{w:?}");
        assert!(w[1].contains("largest sd 31 (2.000e4)"), "{w:?}");
        assert!(w[1].contains(": 7 (4.000e3)"), "{w:?}");
        // Far below the trace: bound 5 × 1.4826 + 0.01 × 1000 + 10 ≈ 27.4;
        // above it is no warning (a fit still rising).
        assert!(elbo_warnings(-1027.0, 0.5, &t, 40, &q).is_empty());
        assert!(elbo_warnings(-900.0, 0.5, &t, 40, &q).is_empty());
        let w = elbo_warnings(-1028.0, 0.5, &t, 40, &q);
        assert!(w.len() == 2 && w[0].contains("far below"), "{w:?}");
        // Absurd per value: −8.5e300 for 40 values, even with a tiny error
        // and a trace that saw it too.
        let absurd = trace(&[-8.5e300; 60]);
        let w = elbo_warnings(-8.5e300, 1e290, &absurd, 40, &q);
        assert!(w.len() == 2 && w[0].contains("per observed value"), "{w:?}");
        // Bound 10⁴ nats per value: 3.99e5 for 40 values is inside, 4.01e5
        // beyond.
        assert!(elbo_warnings(-3.99e5, 0.0, &trace(&[-3.99e5; 60]), 40, &q).is_empty());
        let w = elbo_warnings(-4.01e5, 0.0, &trace(&[-4.01e5; 60]), 40, &q);
        assert!(w.len() == 2 && w[0].contains("per observed value"), "{w:?}");
        // The report's case: −6.2e5 ± 5.4e5.
        let w = elbo_warnings(-6.2e5, 5.4e5, &trace(&[-6.0e5; 60]), 100, &q);
        assert!(w.iter().any(|m| m.contains("standard error")), "{w:?}");
        // Non-finite: the status says it; no factors for categorical ones.
        assert!(elbo_warnings(f64::NAN, 1.0, &t, 40, &q).is_empty());
        let none = GaussianSummary {
            mean: vec![],
            sd: vec![],
            shape: vec![40, 0],
        };
        assert_eq!(elbo_warnings(-1000.0, 30.0, &t, 40, &none).len(), 1);
    }

    #[test]
    fn a_non_finite_final_elbo_marks_a_finished_run_diverged() {
        for bad in [f64::NAN, f64::NEG_INFINITY, f64::INFINITY] {
            assert_eq!(
                final_status(FitStatus::Ok, bad, 300),
                FitStatus::Diverged { at: 300 }
            );
        }
        assert_eq!(final_status(FitStatus::Ok, -1.5e40, 300), FitStatus::Ok);
        // A run that stopped early keeps the step where it stopped.
        let early = FitStatus::Diverged { at: 17 };
        assert_eq!(final_status(early, f64::NAN, 300), early);
        assert_eq!(final_status(early, -3.0, 300), early);
    }
}
