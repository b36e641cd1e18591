//! The settings of a fit ([`FitOptions`]), checked once into
//! [`CheckedOptions`] before anything runs.

use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::stop::StopRule;
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
    /// How F-VI updates categorical local factors (models with discrete
    /// local states): Adam steps on their logits (`"gradient"`, the
    /// default) or sweeps of mean-field coordinate ascent (`"cavi"`: one
    /// step is one sweep; θ fixed, the libtorch engine; see
    /// [`LocalUpdates`]). Left out of a serialisation when it is the
    /// default, so configs without it read and write as before.
    #[serde(default, skip_serializing_if = "LocalUpdates::is_gradient")]
    pub local_updates: LocalUpdates,
    /// Stop early when the ELBO has stopped improving (default none: all
    /// `steps`, as in the paper; see [`StopRule`] for the rule and its
    /// defaults). Left out of a serialisation when absent, so configs
    /// and reports without it read and write as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopRule>,
}

/// How F-VI updates categorical local factors ([`FitOptions::local_updates`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalUpdates {
    /// Adam steps on every parameter, the logits of q(z_n) included (the
    /// paper's F-VI; gradient steps on logits can stall in a local
    /// optimum of a chain model: issue 17).
    #[default]
    Gradient,
    /// Mean-field coordinate ascent (CAVI) on the categorical factors:
    /// each step is one sweep of exact coordinate updates
    /// `log q_n(k) = ∂E_q[log p(x, z | θ)] / ∂q_n(k) + const`, taken in two
    /// half-sweeps (even n, then odd n), which assumes that z_n interacts
    /// with z_{n±1} only (checked when the fit starts, and the ELBO is
    /// checked never to decrease). F-VI with θ fixed
    /// ([`crate::FitRequest::fixed_theta`]) on the libtorch engine; the
    /// trace holds the exact ELBO after each sweep, and `lr` and `draws`
    /// are not used.
    Cavi,
    /// [`LocalUpdates::Cavi`] after deterministic annealing (Ueda & Nakano
    /// 1998; Katahira et al. 2008 for HMMs): during the first half of the
    /// steps the sweeps maximise `β E_q[log p(x, z | θ)] + H(q)` with β
    /// rising linearly from [`ANNEAL_START`] to 1, which smooths away the
    /// local optima that plain CAVI sticks in; the second half is plain
    /// CAVI (β = 1). The trace holds the ELBO (β = 1) after every sweep,
    /// which may fall while β < 1.
    AnnealedCavi,
}

/// The first inverse temperature β of [`LocalUpdates::AnnealedCavi`]
/// (0.3: on discrete HMM data like issue 17's, annealing from 0, 0.1 or 0.3
/// over 50 sweeps reached the same optimum whatever the start, within 0.2
/// nats of the best of 100 random CAVI starts or above it; from 0.5 the
/// start still mattered).
pub const ANNEAL_START: f64 = 0.3;

impl LocalUpdates {
    /// Whether this is the default, [`LocalUpdates::Gradient`].
    pub fn is_gradient(&self) -> bool {
        *self == Self::Gradient
    }
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
    /// The fastest engine that supports the model, method, options and
    /// device (the default; [`crate::FitRequest::engine`] says which, and
    /// [`crate::Fit::engine`] records it): [`Engine::Fused`] on the CPU for
    /// the scalar models (linear, nonlinear, saw) with a free q(θ), full
    /// batches and no warm start; [`Engine::Torch`] otherwise. (On CUDA the
    /// fused and graph engines stay opt-in until their device tests pass
    /// again: docs/status.md.)
    #[default]
    Auto,
    /// libtorch kernels and autograd; every model, method and device.
    Torch,
    /// The fused engine: analytic per-element gradients instead of
    /// autograd, for the scalar models (linear, nonlinear, saw) with a free
    /// q(θ) and full batches. Same objective and Adam, its own random draws.
    /// On the CPU F-VI, Const and A-VI; on CUDA F-VI (two kernel launches
    /// per step, the draws never stored, blocks captured as CUDA graphs).
    Fused,
    /// The libtorch step of [`Engine::Torch`] (same draws, same objective)
    /// with libtorch's fused Adam kernel and step counts on the device
    /// ([`avi_cuda::FusedAdam`]), so that no step reads the host. On CUDA
    /// the `check_every` steps between two checks are captured once as a
    /// CUDA graph and replayed with one launch; on the
    /// CPU the same steps run without capture. Mini-batches in their fixed
    /// order (no `shuffle`), each block a whole number of epochs; with
    /// monitoring, blocks of gcd(`check_every`, the observer's
    /// [`crate::Observer::monitor_every`]) steps, monitored between replays.
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
            engine: Engine::Auto,
            lr_schedule: Vec::new(),
            local_updates: LocalUpdates::Gradient,
            stop: None,
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
        if let Some(rule) = &self.stop {
            rule.check()?;
        }
        Ok(())
    }

    /// Check every setting once and keep the checked options (the type the
    /// training loop takes).
    pub fn checked(self) -> Result<CheckedOptions> {
        self.check()?;
        Ok(CheckedOptions(self))
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
    pub(crate) fn check_schedule_blocks(&self, block: usize, engine: &str) -> Result<()> {
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

/// [`FitOptions`] that passed [`FitOptions::check`] (made by
/// [`FitOptions::checked`]); read them through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedOptions(FitOptions);

impl std::ops::Deref for CheckedOptions {
    type Target = FitOptions;

    fn deref(&self) -> &FitOptions {
        &self.0
    }
}

impl CheckedOptions {
    /// The options, to change and check again.
    pub fn into_inner(self) -> FitOptions {
        self.0
    }

    /// The same options with another engine (a choice among checked
    /// alternatives: nothing to re-check).
    pub(crate) fn with_engine(mut self, engine: Engine) -> Self {
        self.0.engine = engine;
        self
    }
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

    /// `local_updates` is left out of a serialisation at its default (so
    /// existing configs read and write as before) and reads its names.
    #[test]
    fn local_updates_default_is_not_written() {
        let text = serde_json::to_string(&FitOptions::default()).unwrap();
        assert!(!text.contains("local_updates"), "{text}");
        for (name, want) in [
            ("gradient", LocalUpdates::Gradient),
            ("cavi", LocalUpdates::Cavi),
            ("annealed_cavi", LocalUpdates::AnnealedCavi),
        ] {
            let with = text.replace('}', &format!(",\"local_updates\":\"{name}\"}}"));
            let back: FitOptions = serde_json::from_str(&with).unwrap();
            assert_eq!(back.local_updates, want);
        }
        let back: FitOptions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, FitOptions::default());
    }

    /// `stop` is left out of a serialisation when absent; `"stop": {}` is
    /// the default rule, and its settings are checked.
    #[test]
    fn stop_is_opt_in() {
        let text = serde_json::to_string(&FitOptions::default()).unwrap();
        assert!(!text.contains("stop"), "{text}");
        let with = text.replace('}', ",\"stop\":{}}");
        let back: FitOptions = serde_json::from_str(&with).unwrap();
        assert_eq!(back.stop, Some(StopRule::default()));
        let bad = text.replace('}', ",\"stop\":{\"window\":1}}");
        let bad: FitOptions = serde_json::from_str(&bad).unwrap();
        assert_eq!(field_of(&bad), "stop.window");
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
}
