//! What a fit returns: [`Fit`], its [`Trace`] and [`FitStatus`], and the
//! warnings about a final ELBO that may not be trusted.

use serde::{Deserialize, Serialize};

use crate::family::GaussianSummary;
use crate::method::Variational;
use crate::options::Engine;
use crate::stop::Convergence;

/// Whether a fit finished normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
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
    /// Stopped at the end of this (1-based) step, before the steps asked
    /// for, because an interrupt was requested
    /// ([`crate::FitRequest::interrupt`]); the result is that of the
    /// parameters there.
    Interrupted {
        /// The last step taken.
        at: usize,
    },
}

/// How a [`Trace`]'s time stamps were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// The host clock at the end of every step (engines that take one step
    /// at a time).
    #[default]
    Step,
    /// The host clock at the end of each block of steps run as one unit
    /// (a CUDA graph replay), spread evenly over the block's steps: exact
    /// at block ends only (no host synchronisation inside a block).
    Block,
}

/// The ELBO estimate of every step and the wall-clock time at its end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Whether `seconds` are per step or per block.
    #[serde(default)]
    pub clock: Clock,
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

/// The result of a fit ([`crate::FitRequest::run`]). Serialises (serde)
/// to everything but the fitted [`Variational`] (non-finite numbers as
/// `null` in JSON); the `avi` binary's run report holds the same numbers.
#[derive(Debug, Serialize)]
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
    /// Ok, diverged or interrupted.
    pub status: FitStatus,
    /// The last step when the fit's [`crate::StopRule`] stopped it early
    /// (`None`: no rule, or it ran all its steps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<usize>,
    /// Why the rule stopped it, with its numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Whether the ELBO had stopped rising at the end
    /// ([`crate::verdict`]); `None` for a diverged fit or a trace too
    /// short to tell. A fit that has not converged also says so in
    /// [`Fit::warnings`].
    pub convergence: Option<Convergence>,
    /// Number of learned scalars.
    pub num_parameters: usize,
    /// The engine that took the steps (never [`Engine::Auto`]).
    pub engine: Engine,
    /// libtorch's CPU threads during the fit.
    pub threads: usize,
    /// The fitted variational parameters (for further work, e.g. F-VI steps
    /// started from an A-VI solution). Not serialised.
    #[serde(skip)]
    pub variational: Variational,
    /// Why the final ELBO of a fit that finished may not be trusted, in
    /// words (empty when nothing is amiss); see [`elbo_warnings`] for the
    /// bounds. Each names the local factors most out of line.
    pub warnings: Vec<String>,
    /// For a semi-amortized method: its inner steps, the switch, and the
    /// encoder's own ELBO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semi: Option<SemiReport>,
}

/// What a semi-amortized fit ([`crate::MethodConfig::Semi`]) reports beside
/// the common fields. With `refine`, [`Fit::elbo`] and [`Fit::q_z`] are
/// those of the refined factors: the final encoder's output refined by K
/// more inner steps (on the fit's generator), then evaluated on
/// `eval_draws` fresh draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SemiReport {
    /// Inner refinement steps taken in training: K × iterations (not
    /// counted in [`Fit::iterations`]); 0 for `switch_at`.
    pub inner_steps: usize,
    /// K, the inner steps per training step (`refine`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refine_steps: Option<usize>,
    /// The step after which the fit switched from A-VI to F-VI
    /// (`switch_at`, when the fit got that far).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<usize>,
    /// With `refine`: the final ELBO at the encoder's own output (no
    /// refinement), `eval_draws` fresh draws, and its standard error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_elbo: Option<(f64, f64)>,
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
pub(crate) fn median(v: &[f64]) -> f64 {
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

/// The status of a fit whose steps ended with `status` and whose final
/// parameters evaluate to `elbo`: a run whose every step estimate stayed
/// finite but whose final ELBO does not (an estimate of −10⁴⁰ that
/// overflows with more draws) has diverged too, at its last step, rather
/// than finished with no result.
pub(crate) fn final_status(status: FitStatus, elbo: f64, steps: usize) -> FitStatus {
    match status {
        FitStatus::Ok if !elbo.is_finite() => FitStatus::Diverged { at: steps },
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ..Trace::default()
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
