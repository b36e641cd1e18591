//! Semi-amortized VI (`{"kind": "semi", ...}`, see `docs/semi.md`): the
//! inference function's output refined by K gradient steps inside every
//! training step (Kim et al. 2018, SA-VAE), or A-VI for S steps followed by
//! F-VI started at the encoder's output (the paper's suggestion, digest §6).
//!
//! Refinement, with λ the `[N, W]` raw rows of the local factors (means and
//! log-sds, or logits) and λ₀ = f_φ(x):
//!
//! λ_{k+1} = λ_k + η ∇_λ ELBO(λ_k, q(θ)),  k = 0 … K−1,
//!
//! each ELBO a Monte Carlo estimate on fresh draws (θ and z) of the fit's
//! generator, with `draws` draws. There is no 1/N scaling: the gradient with
//! respect to row n is that of the terms of the ELBO that involve z_n (for
//! independent local latents, q(z_n)'s own term), so η is a step size per
//! factor. What each parameter is trained on:
//! - `through: true` (SA-VAE): the loss is −ELBO(λ_K, q(θ)), differentiated
//!   through the K inner steps (second derivatives, `create_graph`) into φ
//!   and q(θ)'s parameters.
//! - `through: false`: the inner steps run on a detached copy of λ₀ (θ held
//!   fixed in them); φ is trained on −ELBO(λ₀, q(θ) held fixed) (A-VI's own
//!   objective, its own draws), q(θ) on −ELBO(λ_K held fixed, q(θ)).
//!
//! The step's reported ELBO is the estimate at the refined factors λ_K.

use avi_models::Model;
use tch::Tensor;

use crate::elbo::{draws_at, rows_at};
use crate::engine::torch::Trainer;
use crate::engine::{Block, EngineState, Stepper};
use crate::method::{MethodConfig, Refine, Variational};
use crate::options::{Engine, Entropy, FitOptions};
use crate::rng::Draws;
use crate::{InferenceError, Result};

/// The error of an engine that does not run semi-amortized methods.
pub(crate) fn engine_refused(engine: &str) -> InferenceError {
    InferenceError::config(
        "engine",
        format!(
            "the {engine} does not support semi-amortized methods (\"kind\": \"semi\"): \
             use the libtorch engine (\"torch\" or \"auto\")"
        ),
    )
}

/// Check a semi-amortized method against the fit's options: K ≥ 1, η > 0
/// finite, 1 ≤ S < steps, the libtorch engine, and refinement on
/// mini-batches only for a model with per-observation terms
/// ([`Model::has_local_terms`]). Other methods pass.
pub(crate) fn check(
    model: &dyn Model,
    method: &MethodConfig,
    opts: &FitOptions,
    engine: Engine,
) -> Result<()> {
    let MethodConfig::Semi { .. } = method else {
        return Ok(());
    };
    if let Some(r) = method.refine() {
        if r.steps == 0 {
            return Err(InferenceError::config(
                "method.refine.steps",
                "must be at least 1 (K inner steps per training step)",
            ));
        }
        if !(r.lr.is_finite() && r.lr > 0.0) {
            return Err(InferenceError::config(
                "method.refine.lr",
                format!("{} must be positive and finite", r.lr),
            ));
        }
        if let Some(c) = r.max_step {
            if !(c.is_finite() && c > 0.0) {
                return Err(InferenceError::config(
                    "method.refine.max_step",
                    format!("{c} must be positive and finite"),
                ));
            }
        }
    }
    if let Some(s) = method.switch_at() {
        if s == 0 || s >= opts.steps {
            return Err(InferenceError::config(
                "method.switch_at",
                format!(
                    "{s} must be at least 1 and less than the fit's steps ({})",
                    opts.steps
                ),
            ));
        }
    }
    if !matches!(engine, Engine::Torch | Engine::Auto) {
        return Err(engine_refused(match engine {
            Engine::Graph => "graph engine",
            _ => "fused engine",
        }));
    }
    if opts.batch_size.is_some() && method.refine().is_some() && !model.has_local_terms() {
        return Err(InferenceError::config(
            "batch_size",
            format!(
                "refinement on mini-batches needs a model with one term per observation \
                 (the linear, nonlinear and BNN models); the {} model's semi-amortized \
                 fits run full batches",
                model.name()
            ),
        ));
    }
    Ok(())
}

/// The loss of one semi-amortized training step with refinement `r` and
/// the step's ELBO estimate at the refined factors (detached). With a
/// mini-batch `(indices, scale)` only the batch's rows are refined, on the
/// batch's own terms ([`crate::elbo::rows_at`]), and the loss is the
/// mini-batch estimate of the ELBO at them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_loss(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    r: &Refine,
    draws: usize,
    entropy: Entropy,
    batch: Option<(&Tensor, f64)>,
    rng: &Draws,
) -> Result<(Tensor, Tensor)> {
    let target = Target::new(model, var, x, draws, entropy, batch, rng);
    let lam0 = match batch {
        Some((idx, _)) => var.local_raw().f_index_select(0, idx)?,
        None => var.local_raw(),
    };
    if r.through {
        let mut lam = lam0;
        for _ in 0..r.steps {
            let e = target.elbo(&lam, true)?;
            let g = Tensor::f_run_backward(&[&e], &[&lam], true, true)?.remove(0);
            // Out of place: the graph keeps every λ_k.
            lam = lam.f_add(&bounded(g * (r.lr / target.scale), r.max_step))?;
        }
        let e = target.elbo(&lam, true)?;
        Ok((e.neg(), e.detach()))
    } else {
        let lam = target.refine(lam0.detach(), r)?;
        let at_refined = target.elbo(&lam, true)?;
        let at_encoder = target.elbo(&lam0, false)?;
        Ok(((&at_refined + at_encoder).neg(), at_refined.detach()))
    }
}

/// K inner steps from the (detached) rows `start` of every observation, θ
/// held fixed; returns the detached refined rows λ_K.
#[allow(clippy::too_many_arguments)]
pub(crate) fn refine_rows(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    start: Tensor,
    r: &Refine,
    draws: usize,
    entropy: Entropy,
    rng: &Draws,
) -> Result<Tensor> {
    Target::new(model, var, x, draws, entropy, None, rng).refine(start, r)
}

/// The inner steps `d` (`[rows, W]`), each row shortened to at most
/// `max_step` in Euclidean length: d_n · c / max(‖d_n‖, c), differentiable
/// (the square root is taken of a value clamped to at least c², so a zero
/// step has a finite gradient). `None`: unchanged.
fn bounded(d: Tensor, max_step: Option<f64>) -> Tensor {
    match max_step {
        None => d,
        Some(c) => {
            let len = d
                .square()
                .sum_dim_intlist(1, true, d.kind())
                .clamp_min(c * c)
                .sqrt();
            &d * len.reciprocal().multiply_scalar(c)
        }
    }
}

/// The ELBO that refinement climbs: of every observation, or of a
/// mini-batch's rows scaled by N/B.
struct Target<'a> {
    model: &'a dyn Model,
    var: &'a Variational,
    /// The data, or the batch's observations.
    x: Tensor,
    /// N/B for a mini-batch, 1 for every observation.
    scale: f64,
    batched: bool,
    draws: usize,
    entropy: Entropy,
    rng: &'a Draws,
}

impl<'a> Target<'a> {
    fn new(
        model: &'a dyn Model,
        var: &'a Variational,
        x: &Tensor,
        draws: usize,
        entropy: Entropy,
        batch: Option<(&Tensor, f64)>,
        rng: &'a Draws,
    ) -> Self {
        let (x, scale) = match batch {
            Some((idx, scale)) => (x.index_select(0, idx), scale),
            None => (x.shallow_clone(), 1.0),
        };
        Self {
            model,
            var,
            x,
            scale,
            batched: batch.is_some(),
            draws,
            entropy,
            rng,
        }
    }

    /// The mean over draws of the ELBO estimate at the rows `local`; with
    /// `theta_grad` false q(θ)'s parameters enter detached.
    fn elbo(&self, local: &Tensor, theta_grad: bool) -> Result<Tensor> {
        let (m, v, x, d, e, rng) = (
            self.model,
            self.var,
            &self.x,
            self.draws,
            self.entropy,
            self.rng,
        );
        let per_draw = if self.batched {
            rows_at(m, v, local, theta_grad, x, self.scale, d, e, rng)?
        } else {
            draws_at(m, v, local, theta_grad, x, d, e, None, rng)?
        };
        Ok(per_draw.mean(x.kind()))
    }

    /// K plain gradient steps of size η per factor from the detached rows
    /// `start`, θ held fixed; the detached λ_K.
    fn refine(&self, start: Tensor, r: &Refine) -> Result<Tensor> {
        let mut lam = start.detach().set_requires_grad(true);
        let step = r.lr / self.scale;
        for _ in 0..r.steps {
            let e = self.elbo(&lam, false)?;
            let g = Tensor::f_run_backward(&[&e], &[&lam], false, false)?.remove(0);
            lam = tch::no_grad(|| &lam + bounded(g * step, r.max_step)).set_requires_grad(true);
        }
        Ok(lam.detach())
    }
}

/// `switch_at`: the libtorch trainer of A-VI's family for the first S steps,
/// then the trainer of F-VI's free factors started at the encoder's output
/// ([`Variational::to_free`]; q(θ) carried over) with a fresh Adam state
/// (the learning rate in force carries over), the same generator stream
/// and data. The trace is continuous; checkpoints are refused.
pub(crate) struct Switch<'a> {
    trainer: Option<Trainer<'a>>,
    at: usize,
    done: usize,
}

impl<'a> Switch<'a> {
    /// Wrap `trainer` (A-VI's family) to switch after `at` steps.
    pub(crate) fn new(trainer: Trainer<'a>, at: usize) -> Self {
        Self {
            trainer: Some(trainer),
            at,
            done: 0,
        }
    }

    fn trainer(&mut self) -> Result<&mut Trainer<'a>> {
        self.trainer
            .as_mut()
            .ok_or_else(|| InferenceError::config("method.switch_at", "the switch failed"))
    }
}

impl Stepper for Switch<'_> {
    fn steps(&mut self, len: usize) -> Result<Block> {
        let first = if self.done < self.at {
            (self.at - self.done).min(len)
        } else {
            len
        };
        let mut block = self.trainer()?.steps(first)?;
        self.done += block.values.len();
        if self.done == self.at && block.values.len() == first {
            let a = self
                .trainer
                .take()
                .ok_or_else(|| InferenceError::config("method.switch_at", "the switch failed"))?;
            self.trainer = Some(a.switch_to_free()?);
        }
        if first < len && block.values.len() == first {
            let rest = self.trainer()?.steps(len - first)?;
            self.done += rest.values.len();
            block.values.extend(rest.values);
            if let (Some(a), Some(b)) = (block.stamps.as_mut(), rest.stamps) {
                a.extend(b);
            }
        }
        Ok(block)
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.trainer()?.set_lr(lr);
        Ok(())
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        match &self.trainer {
            Some(t) => Stepper::params_finite(t),
            None => Ok(vec![false]),
        }
    }

    fn monitor(&mut self, run: usize, f: &mut dyn FnMut(&Variational) -> Result<()>) -> Result<()> {
        Stepper::monitor(self.trainer()?, run, f)
    }

    fn data(&self) -> Option<Tensor> {
        self.trainer.as_ref().map(|t| t.data().shallow_clone())
    }

    fn state(&self) -> Result<EngineState> {
        Err(InferenceError::config(
            "checkpoint",
            "a semi-amortized fit with `switch_at` cannot checkpoint (resuming across the switch is not supported)",
        ))
    }

    fn restore(&mut self, _state: &EngineState) -> Result<()> {
        Err(self.state().unwrap_err())
    }

    fn name(&self) -> &'static str {
        "libtorch engine (semi-amortized switch)"
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        let t = self
            .trainer
            .take()
            .ok_or_else(|| InferenceError::config("method.switch_at", "the switch failed"))?;
        Box::new(t).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::FunctionConfig;
    use crate::method::Edges;

    fn semi(refine: Option<Refine>, switch_at: Option<usize>) -> MethodConfig {
        MethodConfig::Semi {
            function: FunctionConfig::Poly { degree: 1 },
            standardize: true,
            window: [0, 0],
            edges: Edges::Pad,
            refine,
            switch_at,
        }
    }

    fn refine(steps: usize, lr: f64) -> Option<Refine> {
        Some(Refine {
            steps,
            lr,
            through: true,
            max_step: None,
        })
    }

    /// The gradient of the `through` loss −ELBO(λ_K) with respect to the
    /// encoder's and q(θ)'s parameters, back-propagated through the K inner
    /// steps (second derivatives), against central finite differences of
    /// the same loss with the same draws (the generator reset before every
    /// evaluation). Linear model, f64, K = 3: the loss is smooth and
    /// deterministic given the draws, so the two agree to the finite
    /// differences' error: relative 1e-5 allowed (h = 1e-5; measured
    /// 1.5e-10). Without the second-order terms (`create_graph` false in
    /// the inner steps) the first element misses by 4 % (measured −0.565
    /// against −0.544): the check can fail. The same with every row's
    /// inner step bounded (`max_step`), through the bound's derivative.
    #[test]
    fn the_through_gradient_matches_finite_differences() {
        use tch::{Device, Kind};
        let _generator = crate::rng::test_serial();
        let model = avi_models::LinearModel::new(1.155, 2.43).unwrap();
        let x = Tensor::from_slice(&model.simulate(6, 3, None).unwrap());
        tch::manual_seed(5);
        let method = semi(refine(3, 0.4), None);
        let var = Variational::new(
            &method,
            &x,
            0.0,
            1,
            crate::function::Output::Gaussian { dim: 1 },
            None,
            crate::forms::Init::default(),
            Kind::Double,
            Device::Cpu,
        )
        .unwrap();
        // Unbounded steps, and every row's step shortened to 1e-3 (all of
        // them are longer: the bounded branch's derivative).
        for max_step in [None, Some(1e-3)] {
            let r = Refine {
                max_step,
                ..*method.refine().unwrap()
            };
            let ((), mut rng) = crate::rng::seeded(11, Device::Cpu, || Ok(())).unwrap();
            let Draws::Own(g) = &rng else {
                panic!("a CPU generator of its own")
            };
            let start = g.state().unwrap();
            // The inner gradients need autograd: no `no_grad` around the loss.
            let loss = |rng: &mut Draws| -> Tensor {
                if let Draws::Own(g) = rng {
                    g.set_state(&start).unwrap();
                }
                step_loss(&model, &var, &x, &r, 4, Entropy::Mc, None, rng)
                    .unwrap()
                    .0
            };
            let params = var.vs.trainable_variables();
            for p in &params {
                let _ = p.grad().f_zero_();
            }
            loss(&mut rng).backward();
            let h = 1e-5;
            let mut worst: f64 = 0.0;
            for p in &params {
                let grad = crate::family::host_vec(&p.grad()).unwrap();
                let flat = p.view([-1]);
                for (j, want) in grad.iter().enumerate() {
                    let at = |delta: f64| {
                        tch::no_grad(|| {
                            let _ = flat.get(j as i64).f_add_scalar_(delta).unwrap();
                        });
                    };
                    at(h);
                    let up = loss(&mut rng).double_value(&[]);
                    at(-2.0 * h);
                    let down = loss(&mut rng).double_value(&[]);
                    at(h);
                    let fd = (up - down) / (2.0 * h);
                    let rel = (fd - want).abs() / want.abs().max(1.0);
                    worst = worst.max(rel);
                    assert!(
                        rel < 1e-5,
                        "max_step {max_step:?}, parameter element {j}: autograd {want}, FD {fd}"
                    );
                }
            }
            eprintln!("max_step {max_step:?}: worst relative difference {worst:e}");
        }
    }

    /// Bounded steps: a row longer than c is shortened to length c in its
    /// own direction, a shorter one (and a zero row) is kept; the gradient
    /// at a zero row is finite.
    #[test]
    fn bounded_steps_shorten_only_long_rows() {
        let d = Tensor::from_slice(&[3.0, 4.0, 0.3, 0.4, 0.0, 0.0]).view([3, 2]);
        let got =
            crate::family::host_vec(&bounded(d.shallow_clone(), Some(1.0)).view([-1])).unwrap();
        let want = [0.6, 0.8, 0.3, 0.4, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{got:?}");
        }
        assert!(bounded(d.shallow_clone(), None).equal(&d));
        let z =
            Tensor::zeros([1, 2], (tch::Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
        bounded(&z * 2.0, Some(1.0))
            .sum(tch::Kind::Double)
            .backward();
        let g = crate::family::host_vec(&z.grad().view([-1])).unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    }

    /// The mini-batch estimator [`rows_at`] against the full one
    /// ([`draws_at`]) on the same draws: with every row in order and scale 1
    /// they are the same ELBO per draw (nonlinear model) (log p(θ) + Σ_n t_n − log q), summed
    /// in another order, so they agree to f64 rounding (relative 1e-12
    /// allowed); with θ fixed too. The row gradient of a batch estimate
    /// divided by its scale is the factor's own: with
    /// the batch being rows {0, 1, 2} at scale 2 and their draws the same as
    /// in the full estimate (θ drawn first, then z row by row), it matches
    /// the full estimate's gradient in those rows (1e-12).
    #[test]
    fn the_batch_estimator_matches_the_full_one() {
        use tch::{Device, Kind};
        let _generator = crate::rng::test_serial();
        // The nonlinear model: a proper prior on θ and per-observation terms.
        let model = avi_models::NonlinearModel::new(avi_models::NonlinearSim::Model);
        let x = Tensor::from_slice(&model.simulate(6, 3, None).unwrap());
        for fixed in [None, Some(&[0.7][..])] {
            tch::manual_seed(5);
            let var = Variational::new(
                &semi(refine(3, 0.4), None),
                &x,
                0.0,
                1,
                crate::function::Output::Gaussian { dim: 1 },
                fixed,
                crate::forms::Init::default(),
                Kind::Double,
                Device::Cpu,
            )
            .unwrap();
            let ((), mut rng) = crate::rng::seeded(11, Device::Cpu, || Ok(())).unwrap();
            let Draws::Own(g) = &rng else {
                panic!("a CPU generator of its own")
            };
            let start = g.state().unwrap();
            let reset = |rng: &mut Draws| {
                if let Draws::Own(g) = rng {
                    g.set_state(&start).unwrap();
                }
            };
            let lam = var.local_raw().detach().set_requires_grad(true);
            let full = draws_at(&model, &var, &lam, true, &x, 4, Entropy::Mc, None, &rng).unwrap();
            reset(&mut rng);
            let rows = rows_at(&model, &var, &lam, true, &x, 1.0, 4, Entropy::Mc, &rng).unwrap();
            let (a, b) = (
                crate::family::host_vec(&full).unwrap(),
                crate::family::host_vec(&rows).unwrap(),
            );
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-12 * a.abs(), "θ {fixed:?}: {a} vs {b}");
            }
            // With M = 1 the batch's draws are a prefix of the full draws (θ's
            // normals, then z row by row; fewer than 16 normals are drawn one
            // at a time), so rows 0..3 see the same z in both estimates.
            reset(&mut rng);
            let full = draws_at(&model, &var, &lam, true, &x, 1, Entropy::Mc, None, &rng).unwrap();
            let g_full = Tensor::f_run_backward(&[&full.sum(Kind::Double)], &[&lam], false, false)
                .unwrap()
                .remove(0);
            reset(&mut rng);
            let head = lam.narrow(0, 0, 3).detach().set_requires_grad(true);
            let rows = rows_at(
                &model,
                &var,
                &head,
                true,
                &x.narrow(0, 0, 3),
                2.0,
                1,
                Entropy::Mc,
                &rng,
            )
            .unwrap();
            let g_rows = Tensor::f_run_backward(&[&rows.sum(Kind::Double)], &[&head], false, false)
                .unwrap()
                .remove(0)
                / 2.0;
            let want = crate::family::host_vec(&g_full.narrow(0, 0, 3).contiguous()).unwrap();
            let got = crate::family::host_vec(&g_rows.contiguous()).unwrap();
            for (w, g) in want.iter().zip(&got) {
                assert!(
                    (w - g).abs() <= 1e-12 * w.abs().max(1.0),
                    "θ {fixed:?}: {w} vs {g}"
                );
            }
        }
    }

    /// K ≥ 1, η > 0 finite, 1 ≤ S < steps, the libtorch engine, and
    /// mini-batched refinement only for models with per-observation terms;
    /// each refusal names its field.
    #[test]
    fn checks_refuse_bad_semi_methods() {
        let opts = FitOptions {
            steps: 100,
            ..FitOptions::default()
        };
        let linear = avi_models::LinearModel::new(1.0, 1.0).unwrap();
        let check = |m: &MethodConfig, o: &FitOptions, e: Engine| check(&linear, m, o, e);
        let refused = |m: &MethodConfig, o: &FitOptions, e: Engine, field: &str| {
            let err = check(m, o, e).unwrap_err().to_string();
            assert!(err.contains(field), "{m:?}: {err}");
        };
        assert!(check(&semi(refine(1, 0.1), None), &opts, Engine::Auto).is_ok());
        assert!(check(&semi(None, Some(99)), &opts, Engine::Torch).is_ok());
        assert!(check(&MethodConfig::Fvi, &opts, Engine::Fused).is_ok());
        refused(
            &semi(refine(0, 0.1), None),
            &opts,
            Engine::Auto,
            "method.refine.steps",
        );
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            refused(
                &semi(refine(1, lr), None),
                &opts,
                Engine::Auto,
                "method.refine.lr",
            );
        }
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let bad = semi(
                Some(Refine {
                    max_step: Some(c),
                    ..refine(1, 0.1).unwrap()
                }),
                None,
            );
            refused(&bad, &opts, Engine::Auto, "method.refine.max_step");
        }
        for s in [0, 100, 1000] {
            refused(
                &semi(None, Some(s)),
                &opts,
                Engine::Auto,
                "method.switch_at",
            );
        }
        for e in [Engine::Fused, Engine::Graph] {
            let err = check(&semi(refine(1, 0.1), None), &opts, e)
                .unwrap_err()
                .to_string();
            assert!(err.contains("does not support semi-amortized"), "{err}");
        }
        let batched = FitOptions {
            batch_size: Some(10),
            ..opts.clone()
        };
        // The linear model has per-observation terms: its refinement runs on
        // mini-batches (the switch's A-VI and F-VI steps need the model's
        // `log_joint_batch`, which the trainer checks); an HMM's does not.
        assert!(check(&semi(refine(1, 0.1), None), &batched, Engine::Auto).is_ok());
        assert!(check(&semi(None, Some(99)), &batched, Engine::Auto).is_ok());
        let hmm = avi_models::GaussianHmm::new(0.9, 0.5, 1.0, 1.0).unwrap();
        let err = super::check(&hmm, &semi(refine(1, 0.1), None), &batched, Engine::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_size") && err.contains("one term per observation"),
            "{err}"
        );
    }
}
