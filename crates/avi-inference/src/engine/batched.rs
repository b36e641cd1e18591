//! Batched seeds: the runs of one F-VI or Const configuration that differ
//! only in their seed, fitted as one problem with a leading run dimension
//! R on every variational parameter (`[R, D]` for q(θ), `[R, N, 2L]` or
//! `[R, 1, 2L]` for the local factors) and on the draws (`[R, M, …]`): one
//! log-joint evaluation over R·M draws, one backward pass, one fused Adam
//! step per iteration, so a device sees R times the work per kernel.
//!
//! The results are those of R separate [`crate::fit()`] calls with the graph
//! engine's Adam ([`crate::Engine::Graph`]; the torch engine's differs in
//! rounding only): each run is initialised exactly as a separate run with
//! its seed, and draws from its own copy of libtorch's generator
//! ([`avi_cuda::Generator`]) in the order a separate run would, so its
//! draws are the separate run's draws; the R runs' ELBOs are summed, whose
//! gradient with respect to run r's parameters is run r's gradient. Tested
//! against separate runs in `tests/tests/batched.rs`.

use avi_cuda::{FusedAdam, Generator};
use avi_models::Model;
use tch::{Device, Tensor};

use crate::elbo::gaussian_neg_log_q;
use crate::engine::{Block, EngineState, Stepper};
use crate::family::host_vec;
use crate::family::GaussianParams;
use crate::method::{LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::options::FitOptions;
use crate::rng::{seeded, Draws};
use crate::{InferenceError, Result};

/// R seeds of one F-VI or Const problem as one batched optimisation.
pub struct BatchedTrainer<'a> {
    model: &'a dyn Model,
    x: Tensor,
    theta_mean: Tensor,
    theta_log_sd: Tensor,
    local: Tensor,
    shared: bool,
    n: usize,
    local_dim: usize,
    gens: Vec<Generator>,
    adam: FusedAdam,
    opts: FitOptions,
    /// The learning rate of the next step.
    lr: f64,
}

impl std::fmt::Debug for BatchedTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedTrainer")
            .field("model", &self.model.name())
            .field("runs", &self.gens.len())
            .field("shared", &self.shared)
            .finish()
    }
}

impl<'a> BatchedTrainer<'a> {
    /// Validate, then initialise run r exactly as [`crate::testing::Trainer::new`]
    /// does with seed `seeds[r]` and keep a copy of the generator where that
    /// run would continue. F-VI and Const with Gaussian local factors, a
    /// free q(θ) and full batches.
    pub fn new(
        model: &'a dyn Model,
        x: &Tensor,
        method: &MethodConfig,
        seeds: &[u64],
        opts: &FitOptions,
        device: Device,
    ) -> Result<Self> {
        opts.check()?;
        if seeds.is_empty() {
            return Err(InferenceError::config("seeds", "at least one seed"));
        }
        // Every size, and the memory of R runs at once, before allocating.
        let n = usize::try_from(x.size().first().copied().unwrap_or(0)).unwrap_or(0);
        crate::limits::check_runs(
            model,
            n,
            method,
            opts,
            seeds.len(),
            crate::limits::available_memory(device),
        )?;
        crate::limits::check_representable(x, opts.dtype)?;
        let shared = match method {
            MethodConfig::Fvi => false,
            MethodConfig::Const => true,
            MethodConfig::Avi { .. } => {
                return Err(InferenceError::config(
                    "method",
                    "batched seeds cover F-VI and Const (A-VI's networks are not batched)",
                ))
            }
            MethodConfig::Markov(_) => {
                return Err(InferenceError::config(
                    "method.structure",
                    "batched seeds cover mean-field F-VI and Const; \"markov\" runs on the libtorch engine",
                ))
            }
            MethodConfig::Semi { .. } => {
                return Err(crate::semi::engine_refused("batched-seeds engine"))
            }
        };
        if model.local_states().is_some() {
            return Err(InferenceError::config(
                "method",
                "batched seeds need Gaussian local factors",
            ));
        }
        if opts.batch_size.is_some() {
            return Err(InferenceError::config(
                "batch_size",
                "batched seeds support full batches only",
            ));
        }
        let kind = opts.dtype.kind();
        let x = x.to_device(device).to_kind(kind);
        model.check_data(&x)?;
        let (mut tm, mut tls, mut local, mut gens) = (vec![], vec![], vec![], vec![]);
        for &seed in seeds {
            let (var, rng) = seeded(seed, device, || {
                Variational::for_model(method, model, &x, None, kind, device)
            })?;
            let Draws::Own(gen) = rng else {
                unreachable!("seeded gives the fit its own generator")
            };
            let ThetaFactor::Free(q) = &var.theta else {
                unreachable!("no fixed θ was given")
            };
            tm.push(q.mean.detach().copy());
            tls.push(q.log_sd.detach().copy());
            local.push(match &var.local {
                LocalFactor::Free(p) | LocalFactor::Shared(p) => p.detach().copy(),
                LocalFactor::Amortized { .. } => unreachable!("F-VI or Const"),
            });
            gens.push(gen);
        }
        let leaf = |v: &[Tensor]| Tensor::stack(v, 0).set_requires_grad(true);
        let (theta_mean, theta_log_sd, local) = (leaf(&tm), leaf(&tls), leaf(&local));
        let adam = FusedAdam::new(
            vec![
                theta_mean.shallow_clone(),
                theta_log_sd.shallow_clone(),
                local.shallow_clone(),
            ],
            opts.lr,
        )?;
        Ok(Self {
            model,
            n: x.size()[0] as usize,
            x,
            theta_mean,
            theta_log_sd,
            local,
            shared,
            local_dim: model.local_dim(),
            gens,
            adam,
            lr: opts.lr,
            opts: opts.clone(),
        })
    }

    /// Number of runs R.
    pub fn runs(&self) -> usize {
        self.gens.len()
    }

    /// The ELBO draws of every run, `[R, M]`: the computation of
    /// [`crate::elbo_draws`] for each run, batched.
    fn elbo_draws(&self) -> Result<Tensor> {
        let (r, m) = (self.gens.len() as i64, self.opts.draws as i64);
        let (n, l) = (self.n as i64, self.local_dim as i64);
        let d = self.theta_mean.size()[1];
        let kind = self.opts.dtype.kind();
        // Each run draws θ then z from its own generator, as a separate
        // run's elbo_draws does.
        let (mut e_theta, mut e_z) = (Vec::new(), Vec::new());
        for g in &self.gens {
            e_theta.push(g.randn(&[m, d], kind)?);
            e_z.push(g.randn(&[m, n, l], kind)?);
        }
        let (e_theta, e_z) = (Tensor::stack(&e_theta, 0), Tensor::stack(&e_z, 0));
        let q_theta = GaussianParams {
            mean: self.theta_mean.unsqueeze(1),
            log_sd: self.theta_log_sd.unsqueeze(1),
        };
        let theta = q_theta.sample(&e_theta); // [R, M, D]
        let raw = if self.shared {
            self.local.expand([r, n, 2 * l], false)
        } else {
            self.local.shallow_clone()
        };
        let local = GaussianParams {
            mean: raw.narrow(2, 0, l).unsqueeze(1),
            log_sd: raw.narrow(2, l, l).unsqueeze(1),
        };
        let z = local.sample(&e_z); // [R, M, N, L]
        let log_p = self
            .model
            .log_joint(&theta.view([r * m, d]), &z.view([r * m, n, l]), &self.x)?
            .view([r, m]);
        let entropy = self.opts.entropy;
        let neg_log_q_z = gaussian_neg_log_q(
            entropy,
            &e_z,
            &[2, 3],
            local
                .log_sd
                .sum_dim_intlist([2i64, 3].as_slice(), false, kind), // [R, 1]
            (self.n * self.local_dim) as f64,
        );
        let neg_log_q_theta = gaussian_neg_log_q(
            entropy,
            &e_theta,
            &[2],
            q_theta.log_sd.sum_dim_intlist(2, false, kind), // [R, 1]
            d as f64,
        );
        Ok(log_p + neg_log_q_z + neg_log_q_theta)
    }

    /// One iteration of every run: draw, estimate each ELBO, back-propagate
    /// their sum, one Adam step. Returns the `[R]` ELBO estimates (before
    /// the update) on the device.
    pub fn step(&mut self) -> Result<Tensor> {
        let elbo = self
            .elbo_draws()?
            .mean_dim(1, false, self.opts.dtype.kind());
        self.adam.zero_grad();
        elbo.sum(self.opts.dtype.kind()).neg().backward();
        self.adam.step()?;
        Ok(elbo.detach())
    }

    /// Set the learning rate of the following steps (every run).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
        self.adam.set_lr(lr);
    }

    /// The state for a checkpoint: the batched parameters, the fused Adam's
    /// moments and step counts, the learning rate and every run's
    /// generator.
    fn state(&self) -> Result<EngineState> {
        let mut state = EngineState::default();
        state.put("param/theta_mean", &self.theta_mean);
        state.put("param/theta_log_sd", &self.theta_log_sd);
        state.put("param/local", &self.local);
        state.put_fused_adam(&self.adam);
        state.put_f64("lr", &[self.lr]);
        state.put_i64("runs", self.gens.len() as i64);
        for (r, g) in self.gens.iter().enumerate() {
            state.put(format!("rng/{r}"), &g.state()?);
        }
        Ok(state)
    }

    /// Continue from [`BatchedTrainer::state`] of the same batch.
    fn restore(&mut self, state: &EngineState) -> Result<()> {
        if state.i64("runs")? != self.gens.len() as i64 {
            return Err(InferenceError::config(
                "resume",
                "the checkpoint holds another number of runs",
            ));
        }
        state.copy_into("param/theta_mean", &mut self.theta_mean)?;
        state.copy_into("param/theta_log_sd", &mut self.theta_log_sd)?;
        state.copy_into("param/local", &mut self.local)?;
        state.restore_fused_adam(&mut self.adam)?;
        for (r, g) in self.gens.iter_mut().enumerate() {
            g.set_state(state.get(&format!("rng/{r}"))?)?;
        }
        let lr = state.f64s("lr", 1)?[0];
        self.set_lr(lr);
        Ok(())
    }

    /// Per run: whether its parameters are finite (one device read).
    pub fn params_finite(&self) -> Result<Vec<bool>> {
        let r = self.gens.len() as i64;
        let ok = |t: &Tensor| t.isfinite().view([r, -1]).all_dim(1, false);
        let all = ok(&self.theta_mean)
            .logical_and(&ok(&self.theta_log_sd))
            .logical_and(&ok(&self.local));
        Ok(host_vec(&all)?.iter().map(|&v| v != 0.0).collect())
    }

    /// Run r's parameters as a [`Variational`] (on the fit's device; the
    /// tensors share the batch's storage).
    fn run_parts(&self, r: usize) -> Variational {
        let r = r as i64;
        Variational::from_gaussian_parts(
            &self.theta_mean.get(r),
            &self.theta_log_sd.get(r),
            &self.local.get(r),
            self.shared,
            self.n,
        )
    }
}

impl Stepper for BatchedTrainer<'_> {
    fn name(&self) -> &'static str {
        "batched-seeds engine"
    }

    fn runs(&self) -> usize {
        self.gens.len()
    }

    fn steps(&mut self, len: usize) -> Result<Block> {
        Block::timed(len, || self.step())
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        BatchedTrainer::set_lr(self, lr);
        Ok(())
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        BatchedTrainer::params_finite(self)
    }

    fn state(&self) -> Result<EngineState> {
        BatchedTrainer::state(self)
    }

    fn restore(&mut self, state: &EngineState) -> Result<()> {
        BatchedTrainer::restore(self, state)
    }

    fn monitor(&mut self, run: usize, f: &mut dyn FnMut(&Variational) -> Result<()>) -> Result<()> {
        f(&self.run_parts(run))
    }

    fn data(&self) -> Option<Tensor> {
        Some(self.x.shallow_clone())
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        let vars: Vec<Variational> = (0..self.gens.len()).map(|r| self.run_parts(r)).collect();
        Ok(vars
            .into_iter()
            .zip(self.gens)
            .map(|(v, g)| (v, Draws::Own(g)))
            .collect())
    }
}
