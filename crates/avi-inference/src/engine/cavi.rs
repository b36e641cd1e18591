//! Mean-field coordinate ascent (CAVI) for F-VI's categorical local
//! factors with θ fixed ([`crate::LocalUpdates::Cavi`], issue 17): one step
//! of the loop is one sweep of exact coordinate updates.
//!
//! For a fully factorised q(z) = ∏_n Cat(z_n; q_n) over discrete z_n,
//! `E(q) = E_q[log p(x, z | θ)]` ([`Model::expected_log_joint`]) is
//! multilinear in the factors' probabilities, so the best q_n given the
//! others maximises `Σ_k q_n(k) ∂E/∂q_n(k) + H(q_n)`:
//!
//! ```text
//! log q_n(k) = ∂E/∂q_n(k) − log Σ_j exp ∂E/∂q_n(j).
//! ```
//!
//! The partial derivatives come from autograd, for any model. They are
//! taken with respect to the log-probabilities at a point where the rows
//! being updated are uniform (∂E/∂log q_n(k) = q_n(k) ∂E/∂q_n(k) =
//! ∂E/∂q_n(k) / K there), which is exact because E does not depend on q_n
//! through ∂E/∂q_n, and never divides by a probability that has underflowed.
//!
//! **Assumption: chain dependence.** The factors are updated in two
//! half-sweeps, every even n at once, then every odd n. That is exact
//! coordinate ascent when no two even (or two odd) factors interact in E,
//! as in a hidden Markov chain where z_n meets z_{n−1} and z_{n+1} only:
//! then E restricted to one half is a sum of separate linear functions of
//! its factors, and the simultaneous update is the exact block optimum. The
//! engine checks this when it starts (the Hessian of E within each half,
//! applied to a random direction at a random point, must vanish; in f64)
//! and refuses a model that fails it; and the ELBO after every half-sweep
//! must not fall below the one before (up to rounding), else the fit stops
//! with an error (a non-finite ELBO goes into the trace, where the loop
//! marks the fit diverged). A mixture (no interaction) passes too.
//!
//! **Annealing** ([`crate::LocalUpdates::AnnealedCavi`]): during the first
//! half of the sweeps the updates maximise `β E + H` (`log q_n(k) =
//! β ∂E/∂q_n(k) + const`) with β rising linearly from
//! [`crate::ANNEAL_START`] to 1; the ELBO is checked from the first sweep at
//! β = 1 on.

use std::time::Instant;

use avi_models::Model;
use tch::{Kind, Tensor};

use crate::engine::torch::Trainer;
use crate::engine::{params_finite, Block, Draws, EngineState, Stepper};
use crate::function::Output;
use crate::method::{LocalFactor, ThetaFactor, Variational};
use crate::options::{LocalUpdates, ANNEAL_START};
use crate::{InferenceError, Result};

/// F-VI with categorical local factors fitted by CAVI sweeps, θ fixed.
pub struct CaviTrainer<'a> {
    model: &'a dyn Model,
    /// The libtorch trainer that initialised the parameters (seed, draws of
    /// the initial logits) and holds the data and the generator.
    inner: Trainer<'a>,
    /// θ as a `[1, D]` row.
    theta: Tensor,
    /// `[N, 1]` masks of the even and odd rows.
    halves: [Tensor; 2],
    /// The ELBO of the current factors.
    elbo: f64,
    /// Sweeps taken.
    sweep: usize,
    /// The sweeps of deterministic annealing (0: plain CAVI).
    anneal: usize,
}

impl std::fmt::Debug for CaviTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaviTrainer")
            .field("model", &self.model.name())
            .field("elbo", &self.elbo)
            .finish()
    }
}

/// How far (relative) the ELBO may fall in one half-sweep before the fit
/// stops: rounding of a sum over N terms in the fit's dtype.
fn tolerance(kind: Kind, elbo: f64, n: usize) -> f64 {
    let eps = match kind {
        Kind::Double => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    100.0 * eps * (elbo.abs() + n as f64)
}

impl<'a> CaviTrainer<'a> {
    /// Wrap a libtorch trainer of F-VI (already initialised with the fit's
    /// seed) after checking that CAVI applies: categorical local factors,
    /// F-VI, θ fixed, full batches, chain (or no) dependence between the
    /// factors.
    pub(crate) fn new(model: &'a dyn Model, inner: Trainer<'a>) -> Result<Self> {
        let refuse = |reason: String| Err(InferenceError::config("local_updates", reason));
        let Some(k) = model.local_states() else {
            return refuse(format!(
                "CAVI updates categorical local factors; the {} model's local latents are continuous",
                model.name()
            ));
        };
        let categorical = matches!(inner.var.output, Output::Categorical { .. });
        if !categorical || !matches!(inner.var.local, LocalFactor::Free(_)) {
            return refuse(
                "CAVI updates F-VI's free categorical factors (method \"fvi\", or a warm \
                 start with free factors)"
                    .into(),
            );
        }
        if inner.opts.batch_size.is_some() {
            return refuse("CAVI sweeps take every observation (no batch_size)".into());
        }
        let theta = match &inner.var.theta {
            ThetaFactor::Fixed(t) => t.unsqueeze(0),
            ThetaFactor::Free(_) => {
                return refuse(
                    "CAVI is exact with θ fixed (fixed_theta); a free q(θ) takes gradient \
                     updates (\"local_updates\": \"gradient\")"
                        .into(),
                )
            }
        };
        let (inner_anneal, steps) = (inner.opts.local_updates, inner.opts.steps);
        let n = inner.var.n as i64;
        let device = inner.x.device();
        let parity = Tensor::arange(n, (Kind::Int64, device))
            .remainder(2)
            .view([n, 1]);
        let halves = [parity.eq(0), parity.eq(1)];
        check_chain(model, &theta, &inner.x, k, &halves)?;
        let mut me = Self {
            model,
            inner,
            theta,
            halves,
            elbo: f64::NAN,
            sweep: 0,
            anneal: match inner_anneal {
                LocalUpdates::AnnealedCavi => steps / 2,
                _ => 0,
            },
        };
        me.elbo = me.current_elbo()?;
        Ok(me)
    }

    fn logits(&self) -> Tensor {
        match &self.inner.var.local {
            LocalFactor::Free(p) => p.shallow_clone(),
            _ => unreachable!("F-VI has free local factors"),
        }
    }

    /// The exact ELBO `E_q[log p(x, z | θ)] + H(q)` (θ fixed: log p(θ)
    /// left out, as in every fit with θ fixed).
    fn current_elbo(&self) -> Result<f64> {
        tch::no_grad(|| {
            let lp = self.inner.var.local_log_probs();
            let kind = lp.kind();
            let e = self
                .model
                .expected_log_joint(&self.theta, &lp, &self.inner.x)?;
            let h = -(lp.exp() * &lp).sum(kind);
            let prior = self.model.log_prior(&self.theta)?;
            Ok((e.sum(kind) + h - prior.sum(kind)).double_value(&[]))
        })
    }

    /// The inverse temperature of the current sweep.
    fn beta(&self) -> f64 {
        if self.sweep >= self.anneal {
            1.0
        } else {
            ANNEAL_START + (1.0 - ANNEAL_START) * self.sweep as f64 / self.anneal as f64
        }
    }

    /// One half-sweep: the exact update of every factor in `mask` for the
    /// objective `β E + H` (after annealing β = 1: the ELBO, checked not
    /// to fall).
    fn half_sweep(&mut self, mask: &Tensor, beta: f64) -> Result<()> {
        let k = self.model.local_states().unwrap_or(1) as f64;
        let current = tch::no_grad(|| self.inner.var.local_log_probs());
        let at = current
            .where_self(&mask.logical_not(), &current.full_like(-k.ln()))
            .detach()
            .set_requires_grad(true);
        let e = self
            .model
            .expected_log_joint(&self.theta, &at, &self.inner.x)?
            .sum(at.kind());
        let grad = Tensor::run_backward(&[e], &[&at], false, false)
            .pop()
            .ok_or_else(|| InferenceError::config("local_updates", "no gradient"))?;
        tch::no_grad(|| {
            let update = (grad * (k * beta)).log_softmax(1, current.kind());
            let next = update.where_self(mask, &current);
            let mut logits = self.logits();
            logits.copy_(&next);
        });
        let elbo = self.current_elbo()?;
        let tol = tolerance(current.kind(), self.elbo, self.inner.var.n);
        if self.sweep >= self.anneal && elbo < self.elbo - tol {
            return Err(InferenceError::config(
                "local_updates",
                format!(
                    "a CAVI half-sweep lowered the ELBO from {} to {elbo}: the {} model's \
                     factors do not interact along a chain only (CAVI needs z_n to meet \
                     z_(n±1) only)",
                    self.elbo,
                    self.model.name()
                ),
            ));
        }
        self.elbo = elbo;
        Ok(())
    }
}

/// Refuse a model whose expected log joint couples two factors of the same
/// half (or a factor with itself): the Hessian of E with respect to the
/// probabilities of one half, applied to a random direction on that half,
/// must vanish there (f64, at a random interior point).
fn check_chain(
    model: &dyn Model,
    theta: &Tensor,
    x: &Tensor,
    k: usize,
    halves: &[Tensor; 2],
) -> Result<()> {
    let n = x.size()[0];
    let opts = (Kind::Double, x.device());
    let (theta, x) = (theta.to_kind(Kind::Double), x.to_kind(Kind::Double));
    // A fixed point and direction that look random (no generator: the
    // fit's stream is left alone).
    let wave = |freq: f64| {
        Tensor::arange(n * k as i64, opts)
            .multiply_scalar(freq)
            .sin()
            .view([n, k as i64])
    };
    let probs = (wave(12.9898) * 0.5)
        .softmax(1, Kind::Double)
        .set_requires_grad(true);
    for mask in halves {
        let v = wave(78.233) * mask.to_kind(Kind::Double);
        let e = model
            .expected_log_joint(&theta, &probs.log(), &x)?
            .sum(Kind::Double);
        let grad = Tensor::run_backward(&[e], &[&probs], true, true).remove(0);
        let hv =
            Tensor::run_backward(&[(&grad * &v).sum(Kind::Double)], &[&probs], false, false).pop();
        let Some(hv) = hv else { continue };
        let within = (hv * mask.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        let scale = grad.detach().abs().max().double_value(&[]).max(1.0);
        if within.is_nan() || within > 1e-8 * scale {
            return Err(InferenceError::config(
                "local_updates",
                format!(
                    "CAVI in half-sweeps needs z_n to interact with z_(n±1) only; the {} \
                     model's expected log joint couples factors of the same parity \
                     (Hessian {within:e} within a half, gradient {scale:e})",
                    model.name()
                ),
            ));
        }
    }
    Ok(())
}

impl Stepper for CaviTrainer<'_> {
    fn name(&self) -> &'static str {
        "CAVI engine"
    }

    fn steps(&mut self, len: usize) -> Result<Block> {
        let mut values = Vec::with_capacity(len);
        let mut stamps = Vec::with_capacity(len);
        for _ in 0..len {
            let [even, odd] = [
                self.halves[0].shallow_clone(),
                self.halves[1].shallow_clone(),
            ];
            let beta = self.beta();
            self.half_sweep(&even, beta)?;
            self.half_sweep(&odd, beta)?;
            self.sweep += 1;
            values.push(self.elbo);
            stamps.push(Instant::now());
        }
        Ok(Block {
            values,
            stamps: Some(stamps),
        })
    }

    fn set_lr(&mut self, _lr: f64) -> Result<()> {
        Ok(())
    }

    /// The libtorch trainer's state (the factors, its generator; its Adam is
    /// not used by the sweeps) and the sweep count (annealing's position)
    /// and the current factors' ELBO (the ascent check's reference).
    fn state(&self) -> Result<EngineState> {
        let mut state = self.inner.state()?;
        state.put_i64("cavi/sweep", self.sweep as i64);
        state.put_f64("cavi/elbo", &[self.elbo]);
        Ok(state)
    }

    fn restore(&mut self, state: &EngineState) -> Result<()> {
        self.inner.restore(state)?;
        self.sweep = usize::try_from(state.i64("cavi/sweep")?).map_err(|_| {
            InferenceError::config("resume", "the checkpoint's CAVI sweep count is negative")
        })?;
        self.elbo = state.f64s("cavi/elbo", 1)?[0];
        Ok(())
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        Ok(vec![params_finite(&self.inner.var.vs)])
    }

    fn monitor(
        &mut self,
        _run: usize,
        f: &mut dyn FnMut(&Variational) -> Result<()>,
    ) -> Result<()> {
        f(&self.inner.var)
    }

    fn data(&self) -> Option<Tensor> {
        Some(self.inner.x.shallow_clone())
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        Box::new(self.inner).finish()
    }
}
