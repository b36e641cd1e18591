//! The libtorch engine: kernels and autograd, every model, method and
//! device ([`Trainer`]).

use avi_models::Model;
use tch::{Device, Kind, Tensor};

use crate::elbo::{draws_from, evaluate_from};
use crate::engine::{params_finite, Block, EngineState, Stepper};
use crate::forms::{init_hint, Init};
use crate::limits::check_data_size;
use crate::method::{MethodConfig, Variational};
use crate::options::{Engine, FitOptions};
use crate::rng::{seeded, Draws};
use crate::{InferenceError, Result};

/// libtorch's Adam as tch's `nn::Adam` builds it (host step count; through
/// the shim, so that its state can be checkpointed) or libtorch's fused
/// kernel with device step counts ([`Engine::Graph`]).
enum Optim {
    Torch(avi_cuda::TorchAdam),
    Fused(avi_cuda::FusedAdam),
}

impl Optim {
    fn new(var: &Variational, opts: &FitOptions) -> Result<Self> {
        Ok(match opts.engine {
            Engine::Graph => Self::Fused(avi_cuda::FusedAdam::new(
                var.vs.trainable_variables(),
                opts.lr,
            )?),
            _ => Self::Torch(avi_cuda::TorchAdam::new(&var.vs, opts.lr)?),
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
                o.zero_grad()?;
                loss.backward();
                o.step()?;
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
/// one iteration; [`crate::fit()`] drives it with checks and a trace.
pub struct Trainer<'a> {
    model: &'a dyn Model,
    pub(crate) x: Tensor,
    pub(crate) var: Variational,
    optimizer: Optim,
    pub(crate) opts: FitOptions,
    /// Mini-batching: the order of the observations and the next position.
    order: Option<Tensor>,
    position: i64,
    /// The fit's own generator (draws and shuffles).
    pub(crate) rng: Draws,
    /// The learning rate of the following steps.
    lr: f64,
    /// Semi-amortized refinement inside every step ([`crate::semi`]).
    refine: Option<crate::method::Refine>,
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
        Self::with_init(
            model,
            x,
            method,
            fixed_theta,
            opts,
            device,
            init_hint(model),
        )
    }

    /// [`Trainer::new`] with the initialisation `init` instead of the
    /// model's default.
    pub(crate) fn with_init(
        model: &'a dyn Model,
        x: &Tensor,
        method: &MethodConfig,
        fixed_theta: Option<&[f64]>,
        opts: &FitOptions,
        device: Device,
        init: Init,
    ) -> Result<Self> {
        check_data_size(model, x, method, opts, device)?;
        let kind = opts.dtype.kind();
        let x = x.to_device(device).to_kind(kind);
        model.check_data(&x)?;
        // Refinement on mini-batches needs only the per-observation terms
        // (`crate::semi`); every other step needs `log_joint_batch`.
        let refines_rows = method.refine().is_some() && model.has_local_terms();
        if opts.batch_size.is_some() && !model.supports_batches() && !refines_rows {
            return Err(InferenceError::config(
                "batch_size",
                format!("the {} model does not support mini-batches", model.name()),
            ));
        }
        let n = x.size()[0];
        let ((var, order), rng) = seeded(opts.seed, device, || {
            let var =
                Variational::for_model_init(method, model, &x, fixed_theta, kind, device, init)?;
            let order = opts.batch_size.map(|_| {
                if opts.shuffle {
                    Tensor::randperm(n, (Kind::Int64, device))
                } else {
                    Tensor::arange(n, (Kind::Int64, device))
                }
            });
            Ok((var, order))
        })?;
        let optimizer = Optim::new(&var, opts)?;
        Ok(Self {
            model,
            x,
            var,
            optimizer,
            opts: opts.clone(),
            order,
            position: 0,
            rng,
            lr: opts.lr,
            refine: method.refine().copied(),
        })
    }

    /// Start from given variational parameters `start` (a warm start)
    /// instead of the family's initialisation, with a fresh Adam state and
    /// draws from a generator seeded with `opts.seed`. `start` must live on
    /// `device` and hold N = the data's length rows.
    pub fn starting_at(
        model: &'a dyn Model,
        x: &Tensor,
        start: Variational,
        opts: &FitOptions,
        device: Device,
    ) -> Result<Self> {
        opts.check()?;
        if opts.batch_size.is_some() {
            return Err(InferenceError::config(
                "batch_size",
                "a warm start supports full batches only",
            ));
        }
        let x = x.to_device(device).to_kind(opts.dtype.kind());
        model.check_data(&x)?;
        let n = x.size().first().copied().unwrap_or(0) as usize;
        if start.n != n || start.vs.device() != device {
            return Err(InferenceError::config(
                "start",
                format!(
                    "the starting parameters hold {} observations on {:?}; the fit has {n} on {device:?}",
                    start.n,
                    start.vs.device()
                ),
            ));
        }
        if start.local_dim != model.local_dim() {
            return Err(InferenceError::config(
                "start",
                format!(
                    "the starting parameters have local dimension {}, the model {}",
                    start.local_dim,
                    model.local_dim()
                ),
            ));
        }
        let mut start = start;
        start.vs.set_kind(opts.dtype.kind());
        let ((), rng) = seeded(opts.seed, device, || Ok(()))?;
        let optimizer = Optim::new(&start, opts)?;
        Ok(Self {
            model,
            x,
            var: start,
            optimizer,
            opts: opts.clone(),
            order: None,
            position: 0,
            rng,
            lr: opts.lr,
            refine: None,
        })
    }

    /// Continue from given variational parameters (for instance
    /// [`Variational::to_free`] of a fitted A-VI solution) with a fresh Adam
    /// state; `x` must already be on the parameters' device, in `opts.dtype`.
    /// The generator is not re-seeded: the draws continue the stream of
    /// libtorch's default generator (from a copy of it, handed back by
    /// [`Trainer::into_variational`]).
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
        let rng = Draws::Own(avi_cuda::Generator::clone_default(x.device())?);
        Ok(Self {
            model,
            x: x.shallow_clone(),
            var,
            optimizer,
            opts: opts.clone(),
            order: None,
            position: 0,
            rng,
            lr: opts.lr,
            refine: None,
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
                        let device = order.device();
                        self.order = Some(
                            self.rng
                                .with_default(|| Tensor::randperm(n, (Kind::Int64, device)))?,
                        );
                    }
                }
                Some((idx, n as f64 / len as f64))
            }
            _ => None,
        };
        let batch = batch.as_ref().map(|(i, s)| (i, *s));
        let (model, var, x, rng) = (self.model, &self.var, &self.x, &self.rng);
        let (draws, entropy) = (self.opts.draws, self.opts.entropy);
        let (loss, elbo) = match &self.refine {
            Some(r) => crate::semi::step_loss(model, var, x, r, draws, entropy, batch, rng)?,
            None => {
                let elbo = draws_from(model, var, x, draws, entropy, batch, rng)?
                    .mean(self.opts.dtype.kind());
                (elbo.neg(), elbo.detach())
            }
        };
        self.optimizer.minimise(&loss)?;
        Ok(elbo)
    }

    /// The same problem continued on F-VI's free factors started at the
    /// current family's output ([`Variational::to_free`], q(θ) carried
    /// over), with a fresh Adam state at the learning rate in force and the
    /// same generator stream (semi-amortized `switch_at`).
    pub(crate) fn switch_to_free(self) -> Result<Self> {
        let var = self.var.to_free();
        let mut optimizer = Optim::new(&var, &self.opts)?;
        optimizer.set_lr(self.lr);
        Ok(Self {
            var,
            optimizer,
            refine: None,
            ..self
        })
    }

    /// Set the learning rate of the following steps (Adam's moments carry
    /// over).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
        self.optimizer.set_lr(lr);
    }

    /// The state for a checkpoint: every variable of the `VarStore` by
    /// name, Adam's per-parameter state (in the optimizer's order), the
    /// learning rate, the generator, and the mini-batch order and position.
    pub(crate) fn state(&self) -> Result<EngineState> {
        let Draws::Own(rng) = &self.rng else {
            return Err(crate::engine::cannot_checkpoint("graph engine on CUDA"));
        };
        let mut state = EngineState::default();
        let mut vars: Vec<(String, Tensor)> = self.var.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in &vars {
            state.put(format!("param/{name}"), t);
        }
        match &self.optimizer {
            Optim::Torch(adam) => {
                state.put_i64("adam/len", adam.params().len() as i64);
                for i in 0..adam.params().len() {
                    if let Some(s) = adam.state(i)? {
                        state.put_i64(&format!("adam/{i}/step"), s.step);
                        state.put(format!("adam/{i}/exp_avg"), &s.exp_avg);
                        state.put(format!("adam/{i}/exp_avg_sq"), &s.exp_avg_sq);
                    }
                }
            }
            // The graph engine's device-side Adam: its moments and f32 step
            // counts, per parameter.
            Optim::Fused(adam) => state.put_fused_adam(adam),
        }
        state.put_f64("lr", &[self.lr]);
        state.put("rng", &rng.state()?);
        if let Some(order) = &self.order {
            state.put("batch/order", order);
            state.put_i64("batch/position", self.position);
        }
        Ok(state)
    }

    /// Continue from [`Trainer::state`] of a trainer of the same problem.
    pub(crate) fn restore(&mut self, state: &EngineState) -> Result<()> {
        if !matches!(self.rng, Draws::Own(_)) {
            return Err(crate::engine::cannot_checkpoint("graph engine on CUDA"));
        }
        let vars = self.var.vs.variables();
        let saved = state
            .tensors
            .iter()
            .filter(|(n, _)| n.starts_with("param/"))
            .count();
        if saved != vars.len() {
            return Err(InferenceError::config(
                "resume",
                format!(
                    "the checkpoint holds {saved} variables, the fit {}",
                    vars.len()
                ),
            ));
        }
        for (name, mut t) in vars {
            state.copy_into(&format!("param/{name}"), &mut t)?;
        }
        match &mut self.optimizer {
            Optim::Torch(adam) => {
                let len = adam.params().len();
                if !state.has("adam/len") || state.i64("adam/len")? != len as i64 {
                    return Err(InferenceError::config(
                        "resume",
                        "the checkpoint's optimizer has another number of parameters",
                    ));
                }
                for i in 0..len {
                    if !state.has(&format!("adam/{i}/step")) {
                        continue;
                    }
                    let s = avi_cuda::AdamParamState {
                        step: state.i64(&format!("adam/{i}/step"))?,
                        exp_avg: state.get(&format!("adam/{i}/exp_avg"))?.shallow_clone(),
                        exp_avg_sq: state.get(&format!("adam/{i}/exp_avg_sq"))?.shallow_clone(),
                    };
                    let p = &adam.params()[i];
                    if s.exp_avg.kind() != p.kind() || s.exp_avg_sq.kind() != p.kind() {
                        return Err(InferenceError::config(
                            "resume",
                            "the checkpoint's Adam moments are of another dtype",
                        ));
                    }
                    adam.set_state(i, &s)?;
                }
            }
            Optim::Fused(adam) => state.restore_fused_adam(adam)?,
        }
        let Draws::Own(rng) = &mut self.rng else {
            return Err(crate::engine::cannot_checkpoint("graph engine on CUDA"));
        };
        rng.set_state(state.get("rng")?)?;
        let lr = state.f64s("lr", 1)?[0];
        self.set_lr(lr);
        match &mut self.order {
            Some(order) => {
                *order = state
                    .get("batch/order")?
                    .to_device(order.device())
                    .to_kind(Kind::Int64);
                self.position = state.i64("batch/position")?;
            }
            None if state.has("batch/order") => {
                return Err(InferenceError::config(
                    "resume",
                    "the checkpoint is of a mini-batched fit",
                ))
            }
            None => {}
        }
        Ok(())
    }

    /// The current variational parameters.
    pub fn variational(&self) -> &Variational {
        &self.var
    }

    /// Take the variational parameters out of the trainer; libtorch's
    /// default generator continues from where the trainer's draws ended.
    pub fn into_variational(self) -> Result<Variational> {
        self.rng.hand_back()?;
        Ok(self.var)
    }

    /// The final ELBO estimate of the current parameters from `draws` fresh
    /// draws of the trainer's own generator (mean, standard error).
    pub fn evaluate(&self, draws: usize) -> Result<(f64, f64)> {
        evaluate_from(
            self.model,
            &self.var,
            &self.x,
            draws,
            self.opts.entropy,
            &self.rng,
        )
    }

    /// The data on the device, in the fit's dtype.
    pub fn data(&self) -> &Tensor {
        &self.x
    }
}

impl Stepper for Trainer<'_> {
    fn steps(&mut self, len: usize) -> Result<Block> {
        Block::timed(len, || self.step())
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Trainer::set_lr(self, lr);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "libtorch engine"
    }

    fn state(&self) -> Result<EngineState> {
        Trainer::state(self)
    }

    fn restore(&mut self, state: &EngineState) -> Result<()> {
        Trainer::restore(self, state)
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        Ok(vec![params_finite(&self.var.vs)])
    }

    fn monitor(
        &mut self,
        _run: usize,
        f: &mut dyn FnMut(&Variational) -> Result<()>,
    ) -> Result<()> {
        f(&self.var)
    }

    fn data(&self) -> Option<Tensor> {
        Some(self.x.shallow_clone())
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        Ok(vec![(self.var, self.rng)])
    }
}
