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

use crate::forms::FusedModel;
use avi_models::check_finite_data;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::engine::{cannot_checkpoint, params_finite, Block, EngineState, Stepper};
use crate::family::host_vec;
use crate::method::{LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::options::{Entropy, FitOptions};
use crate::rng::{seeded, Draws as EngineDraws};
use crate::{InferenceError, Result};

mod kernel;
mod math;
mod net;
mod rng;

use kernel::*;
pub use kernel::{objective_and_grad, FusedGrad, FusedParams};

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
            MethodConfig::Markov(_) => {
                return Err(InferenceError::config(
                    "engine",
                    "the fused engine does not support \"structure\": \"markov\" (use \"torch\" or \"auto\")",
                ))
            }
            MethodConfig::Fvi | MethodConfig::Const => {
                let params = flat_params(&var)?;
                let len = params.len();
                State::Flat {
                    params,
                    adam: Adam::new(opts.lr, len),
                    shared: *method == MethodConfig::Const,
                }
            }
            MethodConfig::Semi { .. } => return Err(crate::semi::engine_refused("fused engine")),
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

    /// The host parameters and their Adam; `None` for A-VI with a function
    /// the host does not evaluate (libtorch parameters and tch's Adam).
    fn host_parts(&mut self) -> Option<(&mut Vec<f64>, &mut Adam)> {
        match &mut self.state {
            State::Flat { params, adam, .. } => Some((params, adam)),
            State::Host(host) => Some((&mut host.params, &mut host.adam)),
            State::Torch { .. } => None,
        }
    }

    /// The state for a checkpoint: the host parameters, Adam's moments,
    /// step count and learning rate, the steps taken (the Philox draws'
    /// counter) and the generator of the final evaluation.
    pub(crate) fn state(&self) -> Result<EngineState> {
        let (params, adam) = match &self.state {
            State::Flat { params, adam, .. } => (params, adam),
            State::Host(host) => (&host.params, &host.adam),
            State::Torch { .. } => return Err(cannot_checkpoint(TORCH_FALLBACK)),
        };
        let mut state = EngineState::default();
        state.put_f64("params", params);
        state.put_f64("adam/m", &adam.m);
        state.put_f64("adam/v", &adam.v);
        state.put_i64("adam/t", i64::from(adam.t));
        state.put_f64("lr", &[adam.lr]);
        state.put_i64("steps_done", self.steps_done as i64);
        if let EngineDraws::Own(g) = &self.rng {
            state.put("rng", &g.state()?);
        }
        Ok(state)
    }

    /// Continue from [`FusedTrainer::state`] of a trainer of the same
    /// problem.
    pub(crate) fn restore(&mut self, state: &EngineState) -> Result<()> {
        let steps_done = state.i64("steps_done")?;
        if let EngineDraws::Own(g) = &mut self.rng {
            g.set_state(state.get("rng")?)?;
        }
        let Some((params, adam)) = self.host_parts() else {
            return Err(cannot_checkpoint(TORCH_FALLBACK));
        };
        let len = params.len();
        *params = state.f64s("params", len)?;
        adam.m = state.f64s("adam/m", len)?;
        adam.v = state.f64s("adam/v", len)?;
        adam.t = i32::try_from(state.i64("adam/t")?)
            .map_err(|_| InferenceError::config("resume", "Adam's step count is out of range"))?;
        adam.lr = state.f64s("lr", 1)?[0];
        self.steps_done = u64::try_from(steps_done)
            .map_err(|_| InferenceError::config("resume", "a negative step count"))?;
        Ok(())
    }
}

/// The fused engine running an inference function on libtorch.
const TORCH_FALLBACK: &str =
    "fused CPU engine with an inference function it does not evaluate on the host";

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

    fn name(&self) -> &'static str {
        "fused CPU engine"
    }

    fn state(&self) -> Result<EngineState> {
        FusedTrainer::state(self)
    }

    fn restore(&mut self, state: &EngineState) -> Result<()> {
        FusedTrainer::restore(self, state)
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
