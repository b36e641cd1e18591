//! Encoding new data with a fitted family: the point of amortization.
//!
//! [`encode`] gives every new observation x'_n its factor q(z'_n) through the
//! fitted inference function (A-VI: f_φ applied to the windows of the new
//! data, standardised with the *training* statistics; Const: its one
//! factor for every n), keeps q(θ) as fitted, and estimates the
//! **held-out ELBO** of the new data,
//!
//! ```text
//! E_{q(θ) q(z')} [ log p(x', z' | θ) − log q(z') ],
//! ```
//!
//! computed as `model.log_joint − model.log_prior` at M draws of θ ~ q(θ)
//! and z' ~ q(z') (θ's prior and q(θ)'s entropy are left out: they do not
//! depend on the new data, and q(θ) is not refitted). The entropy of q(z')
//! is exact (Gaussian: Σ log s + N'L(½ + ½ log 2π); categorical: the
//! enumerated entropy, the expectation over z' exact through
//! [`avi_models::Model::expected_log_joint`]); only θ (and Gaussian z') is
//! drawn. The standard error is the draws' sd / √M.
//!
//! **Refine** ([`EncodeOptions::refine_steps`]): K steps of F-VI on the new
//! data's local factors, started at the encoder's output, with q(θ) held at
//! its fitted values (its tensors are not trainable), run by the one fit
//! loop ([`crate::FitRequest::start_from`], libtorch engine; the analytic
//! entropy; the rate ×0.1 from half-way and ×0.01 for the last quarter,
//! so that Adam's noise does not lower an ELBO that starts near its
//! optimum). The refined
//! held-out ELBO is estimated with the same draws (same seed), and the
//! difference refined − amortized is the amortization gap on unseen data.
//!
//! F-VI cannot encode: a free family has one factor per training
//! observation and no function for new data (refit, or fit A-VI).

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::elbo::{gaussian_neg_log_q, standard_error};
use crate::family::{summarize, GaussianParams, GaussianSummary};
use crate::function::Output;
use crate::method::{LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::options::{Engine, Entropy, FitOptions, LrStep};
use crate::rng::{seeded, Draws};
use crate::saved::Fitted;
use crate::{FitStatus, InferenceError, Result};

/// Settings of [`encode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodeOptions {
    /// Monte Carlo draws M of the held-out ELBO (default 1,000).
    pub draws: usize,
    /// Seed of the draws (default 0).
    pub seed: u64,
    /// F-VI steps K from the encoder's output (default 0: no refinement).
    pub refine_steps: usize,
    /// Adam's learning rate of the refinement (default 0.01).
    pub refine_lr: f64,
    /// Monte Carlo draws per refinement step (default 100: with few draws,
    /// Adam's noise floor can leave factors that start near their optimum
    /// below it; on the linear model 10 draws ended 0.16 nats below, 100
    /// draws 0.01).
    pub refine_draws: usize,
    /// How many indices of new observations outside the training range to
    /// list (default 20).
    pub max_listed: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            draws: 1_000,
            seed: 0,
            refine_steps: 0,
            refine_lr: 0.01,
            refine_draws: 100,
            max_listed: 20,
        }
    }
}

/// New observations outside the range of the training data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutsideRange {
    /// How many new observations have a value, in some dimension, below
    /// the training minimum or above the training maximum of that
    /// dimension.
    pub count: usize,
    /// The first of them (0-based indices, at most
    /// [`EncodeOptions::max_listed`]).
    pub first: Vec<usize>,
}

/// The result of refining the encoder's factors on the new data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refined {
    /// F-VI steps taken.
    pub steps: usize,
    /// How the refinement ended.
    pub status: FitStatus,
    /// The held-out ELBO of the refined factors.
    pub heldout_elbo: f64,
    /// Its Monte Carlo standard error.
    pub heldout_elbo_se: f64,
    /// Refined minus amortized held-out ELBO (same draws): the
    /// amortization gap on the new data.
    pub heldout_gap: f64,
    /// The Monte Carlo standard error of `heldout_gap`: the sd of the
    /// per-draw differences / √M (both estimates use the same draws, so
    /// this is smaller than √(SE_amortized² + SE_refined²)).
    pub heldout_gap_se: f64,
    /// q(z'_n) after refinement (Gaussian local factors).
    pub q_z: Option<GaussianSummary>,
    /// Probabilities after refinement (categorical local factors).
    pub q_z_probs: Option<Vec<f64>>,
}

/// What [`encode`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoded {
    /// N' of the new data.
    pub n: usize,
    /// q(z'_n) of every new observation, `[N', L]` (Gaussian local
    /// factors).
    pub q_z: Option<GaussianSummary>,
    /// `[N', K]` probabilities, row-major (categorical local factors).
    pub q_z_probs: Option<Vec<f64>>,
    /// q(θ) as fitted (`None` when θ was held fixed).
    pub q_theta: Option<GaussianSummary>,
    /// θ's fixed values, when θ was held fixed.
    pub fixed_theta: Option<Vec<f64>>,
    /// The held-out ELBO of the new data.
    pub heldout_elbo: f64,
    /// Its Monte Carlo standard error.
    pub heldout_elbo_se: f64,
    /// Draws M of the estimate.
    pub draws: usize,
    /// New observations outside the training data's range.
    pub outside_training_range: OutsideRange,
    /// The refinement, when asked for.
    pub refined: Option<Refined>,
}

/// What the held-out ELBO leaves out, in words (for reports).
pub const HELDOUT_EXCLUDES: &str = "log p(θ) and the entropy of q(θ) are left out: \
     E_q[log p(x_new, z | θ) − log q(z)], q(θ) as fitted";

/// Encode `x_new` (`[N']` or `[N', d]` like the training data, any device)
/// with the fitted family (see the module docs), on the family's device.
pub fn encode(
    model: &dyn avi_models::Model,
    fitted: &Fitted,
    x_new: &Tensor,
    opts: &EncodeOptions,
) -> Result<Encoded> {
    let var = &fitted.variational;
    if matches!(var.local, LocalFactor::Free(_)) {
        return Err(InferenceError::Encode(
            "an F-VI fit has one free factor per training observation and no function for new \
             data: new data need a fit of their own, or an amortized family (A-VI, Const) whose \
             encoder gives them factors that F-VI steps can then refine (`refine_steps`, \
             `avi encode --refine K`)"
                .into(),
        ));
    }
    if opts.draws < 2 || opts.draws > crate::options::MAX_DRAWS {
        return Err(InferenceError::config(
            "draws",
            format!(
                "{} draws: must be in 2..={} (the standard error needs two)",
                opts.draws,
                crate::options::MAX_DRAWS
            ),
        ));
    }
    let device = var.vs.device();
    let kind = fitted.dtype().kind();
    let x = x_new.to_device(device).to_kind(kind);
    model.check_data(&x)?;
    let d = if x.dim() == 1 {
        1
    } else {
        x.size()[1] as usize
    };
    if d != fitted.data_range.0.len() {
        return Err(InferenceError::config(
            "data",
            format!(
                "new data of shape {:?}: the family was fitted on observations of {} values",
                x.size(),
                fitted.data_range.0.len()
            ),
        ));
    }
    let raw = var
        .predict_raw(&x)?
        .ok_or_else(|| InferenceError::Encode("this family has no encoder".into()))?;
    let n_new = x.size()[0] as usize;
    let outside = outside_range(&x, &fitted.data_range, opts.max_listed)?;
    let amortized = heldout_values(model, &var.theta, &raw, var.output, &x, opts)?;
    let (heldout, se) = mean_se(&amortized);
    let (q_z, q_z_probs) = local_summary(&raw, var.output)?;
    let (q_theta, fixed_theta) = match &var.theta {
        ThetaFactor::Free(q) => (Some(summarize(&q.detach())?), None),
        ThetaFactor::Fixed(t) => (None, Some(crate::family::host_vec(t)?)),
    };
    let refined = if opts.refine_steps > 0 {
        Some(refine(model, fitted, &raw, &x, opts, &amortized)?)
    } else {
        None
    };
    Ok(Encoded {
        n: n_new,
        q_z,
        q_z_probs,
        q_theta,
        fixed_theta,
        heldout_elbo: heldout,
        heldout_elbo_se: se,
        draws: opts.draws,
        outside_training_range: outside,
        refined,
    })
}

fn local_summary(
    raw: &Tensor,
    output: Output,
) -> Result<(Option<GaussianSummary>, Option<Vec<f64>>)> {
    Ok(match output {
        Output::Gaussian { .. } | Output::Markov => (Some(summarize(&output.gaussian(raw))?), None),
        Output::Categorical { .. } => (
            None,
            Some(crate::family::host_vec(&raw.softmax(1, raw.kind()))?),
        ),
    })
}

/// Count the rows of `x` with a value outside `range` in its dimension.
fn outside_range(
    x: &Tensor,
    range: &(Vec<f64>, Vec<f64>),
    max_listed: usize,
) -> Result<OutsideRange> {
    let x = x.to_kind(Kind::Double);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    let min = Tensor::from_slice(&range.0)
        .to_device(x.device())
        .unsqueeze(0);
    let max = Tensor::from_slice(&range.1)
        .to_device(x.device())
        .unsqueeze(0);
    let out = x
        .lt_tensor(&min)
        .logical_or(&x.gt_tensor(&max))
        .any_dim(1, false);
    let flags = Vec::<bool>::try_from(out.to_device(Device::Cpu))?;
    let indices: Vec<usize> = flags
        .iter()
        .enumerate()
        .filter_map(|(i, &o)| o.then_some(i))
        .collect();
    Ok(OutsideRange {
        count: indices.len(),
        first: indices.into_iter().take(max_listed).collect(),
    })
}

/// Mean and standard error of per-draw values.
pub(crate) fn mean_se(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (mean, standard_error(values, mean))
}

/// The held-out ELBO of local rows `raw` (`[N', W]`) and q(θ) `theta` on
/// `x` at each of `opts.draws` draws seeded with `opts.seed`.
pub(crate) fn heldout_values(
    model: &dyn avi_models::Model,
    theta: &ThetaFactor,
    raw: &Tensor,
    output: Output,
    x: &Tensor,
    opts: &EncodeOptions,
) -> Result<Vec<f64>> {
    let (kind, device) = (x.kind(), x.device());
    let ((), rng) = seeded(opts.seed, device, || Ok(()))?;
    let (n, w) = (raw.size()[0], raw.size()[1]);
    let per_draw = match output {
        Output::Gaussian { dim } => (n as usize * dim).max(1),
        Output::Categorical { .. } => n as usize * w as usize,
        Output::Markov => (n as usize).max(1),
    };
    let chunk = (crate::limits::EVAL_CHUNK_ELEMENTS / per_draw).clamp(1, opts.draws);
    let mut values = Vec::with_capacity(opts.draws);
    tch::no_grad(|| -> Result<()> {
        let mut left = opts.draws;
        while left > 0 {
            let m = left.min(chunk);
            let v = heldout_draws(model, theta, raw, output, x, m as i64, &rng, kind, device)?;
            values.extend(Vec::<f64>::try_from(
                v.to_kind(Kind::Double).to_device(Device::Cpu),
            )?);
            left -= m;
        }
        Ok(())
    })?;
    Ok(values)
}

#[allow(clippy::too_many_arguments)]
fn heldout_draws(
    model: &dyn avi_models::Model,
    theta: &ThetaFactor,
    raw: &Tensor,
    output: Output,
    x: &Tensor,
    m: i64,
    rng: &Draws,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let theta = match theta {
        ThetaFactor::Free(q) => {
            let eps = rng.randn(&[m, q.mean.size()[0]], kind, device)?;
            q.sample(&eps)
        }
        ThetaFactor::Fixed(t) => t.unsqueeze(0).expand([m, t.size()[0]], false),
    };
    let local = match output {
        Output::Categorical { .. } => {
            let log_probs = raw.log_softmax(1, kind);
            let expected = model.expected_log_joint(&theta, &log_probs, x)?;
            expected - (log_probs.exp() * &log_probs).sum(kind)
        }
        Output::Gaussian { dim } => {
            let q: GaussianParams = output.gaussian(raw);
            let eps = rng.randn(&[m, raw.size()[0], dim as i64], kind, device)?;
            let z = q.sample(&eps);
            let count = (raw.size()[0] as usize * dim) as f64;
            model.log_joint(&theta, &z, x)?
                + gaussian_neg_log_q(Entropy::Analytic, &eps, &[1, 2], q.sum_log_sd(), count)
        }
        Output::Markov => {
            let eps = rng.randn(&[m, raw.size()[0], 1], kind, device)?;
            let (z, sum_log_sd) = crate::markov::sample(raw, &eps);
            let count = raw.size()[0] as f64;
            model.log_joint(&theta, &z, x)?
                + gaussian_neg_log_q(Entropy::Analytic, &eps, &[1, 2], sum_log_sd, count)
        }
    };
    Ok(local - model.log_prior(&theta)?)
}

/// K F-VI steps on the new data's local factors from `raw`, q(θ) held.
fn refine(
    model: &dyn avi_models::Model,
    fitted: &Fitted,
    raw: &Tensor,
    x: &Tensor,
    opts: &EncodeOptions,
    amortized: &[f64],
) -> Result<Refined> {
    let var = &fitted.variational;
    let result = refine_fit(model, &var.theta, var.output, var.local_dim, raw, x, opts)?;
    let rows = result.variational.local_raw().detach();
    let refined = heldout_values(model, &var.theta, &rows, var.output, x, opts)?;
    let (elbo, se) = mean_se(&refined);
    let diff: Vec<f64> = refined.iter().zip(amortized).map(|(r, a)| r - a).collect();
    let (gap, gap_se) = mean_se(&diff);
    let (q_z, q_z_probs) = local_summary(&rows, var.output)?;
    Ok(Refined {
        steps: result.iterations,
        status: result.status,
        heldout_elbo: elbo,
        heldout_elbo_se: se,
        heldout_gap: gap,
        heldout_gap_se: gap_se,
        q_z,
        q_z_probs,
    })
}

/// The refinement's fit: `opts.refine_steps` F-VI steps on free local rows
/// started at `raw` (`[N, W]`, laid out as `output`), with q(θ) (or the
/// fixed θ) copied and held, through the one fit loop ([`crate::fit`] with
/// [`crate::FitRequest::start_from`], libtorch engine, analytic entropy,
/// the rate ×0.1 from half-way and ×0.01 for the last quarter), in the
/// dtype and on the device of `raw`.
pub(crate) fn refine_fit(
    model: &dyn avi_models::Model,
    theta: &ThetaFactor,
    output: Output,
    local_dim: usize,
    raw: &Tensor,
    x: &Tensor,
    opts: &EncodeOptions,
) -> Result<crate::Fit> {
    let device = raw.device();
    let dtype = match raw.kind() {
        Kind::Double => crate::Dtype::F64,
        _ => crate::Dtype::F32,
    };
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    // q(θ) is copied but not trainable: the optimiser updates the local
    // rows only.
    let theta = match theta {
        ThetaFactor::Free(q) => ThetaFactor::Free(GaussianParams {
            mean: root.add("theta_mean", q.mean.detach().copy(), false),
            log_sd: root.add("theta_log_sd", q.log_sd.detach().copy(), false),
        }),
        ThetaFactor::Fixed(t) => ThetaFactor::Fixed(t.shallow_clone()),
    };
    let n = raw.size()[0] as usize;
    let z = root.add("z", raw.detach().copy(), true);
    let start = Variational {
        vs,
        theta,
        local: LocalFactor::Free(z),
        output,
        n,
        local_dim,
    };
    // The rate decays (×0.1 from half-way, ×0.01 for the last quarter) so
    // that Adam's noise floor does not lower an ELBO that starts near its
    // optimum.
    let k = opts.refine_steps;
    let mut lr_schedule = [(k / 2 + 1, 0.1), (3 * k / 4 + 1, 0.01)]
        .into_iter()
        .filter(|&(from, _)| (2..=k).contains(&from))
        .map(|(from, factor)| LrStep { from, factor })
        .collect::<Vec<_>>();
    lr_schedule.dedup_by_key(|s| s.from);
    let fit_opts = FitOptions {
        steps: k,
        lr: opts.refine_lr,
        draws: opts.refine_draws,
        seed: opts.seed,
        eval_draws: 2,
        entropy: Entropy::Analytic,
        dtype,
        engine: Engine::Torch,
        lr_schedule,
        ..FitOptions::default()
    };
    crate::fit(model, x, &MethodConfig::Fvi)
        .options(fit_opts)
        .device(device)
        .start_from(start)
        .run()
}
