//! The fused engine on CUDA: F-VI of the scalar models (linear, nonlinear,
//! saw) with the kernels of [`avi_cuda::FviKernels`]: two launches per
//! iteration, the `[M, N]` draws made in registers and never stored, Adam
//! inside the kernels, nothing read back to the host within a block. Blocks
//! of steps are captured as CUDA graphs as in [`crate::testing::GraphTrainer`].
//!
//! Same objective, gradient and Adam as the fused CPU engine
//! ([`crate::testing::FusedTrainer`]) and the same initial parameters for a seed; its
//! own random draws (Philox4x32-10), computed in f32.

use crate::forms::FusedModel;
use avi_cuda::{FviDebug, FviKernels, FviSettings, FviState, KernelModel};
use avi_models::{check_finite_data, HALF_LN_2PI};
use tch::{Device, Kind, Tensor};

use crate::engine::fused::{flat_params, flat_variational, initial_variational};
use crate::engine::graph::BlockGraph;
use crate::engine::{Block, Stepper};
use crate::method::{MethodConfig, Variational};
use crate::options::{Entropy, FitOptions};
use crate::rng::Draws;
use crate::{InferenceError, Result};

/// F-VI of a scalar model on a CUDA device, in blocks of steps.
pub struct CudaFviTrainer {
    kernels: FviKernels,
    state: FviState,
    settings: FviSettings,
    block: usize,
    buf: Tensor,
    graph: BlockGraph,
    kind: Kind,
    device: Device,
    rng: Draws,
}

impl std::fmt::Debug for CudaFviTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaFviTrainer")
            .field("settings", &self.settings)
            .field("block", &self.block)
            .field("captured", &self.graph.captured())
            .finish()
    }
}

impl CudaFviTrainer {
    /// Validate, initialise the parameters as [`crate::testing::Trainer::new`] does
    /// for `opts.seed`, compile the kernels for `device` and make the first
    /// θ draws. F-VI only, f32, full batches; `block` steps per
    /// [`CudaFviTrainer::step_block`].
    pub fn new(
        model: &FusedModel,
        x: &[f64],
        method: &MethodConfig,
        opts: &FitOptions,
        device: Device,
        block: usize,
    ) -> Result<Self> {
        opts.check()?;
        check_finite_data(x)?;
        if !device.is_cuda() {
            return Err(InferenceError::config(
                "device",
                "the CUDA fused engine needs a CUDA device",
            ));
        }
        if *method != MethodConfig::Fvi {
            return Err(InferenceError::config(
                "engine",
                format!(
                    "on CUDA the fused engine covers F-VI, not {}; use the graph engine",
                    method.label()
                ),
            ));
        }
        if opts.batch_size.is_some() {
            return Err(InferenceError::config(
                "batch_size",
                "the fused engine supports full batches only",
            ));
        }
        if opts.dtype != crate::Dtype::F32 {
            return Err(InferenceError::config(
                "dtype",
                "the CUDA fused engine computes in f32",
            ));
        }
        if block == 0 {
            return Err(InferenceError::config("check_every", "must be at least 1"));
        }
        let (var, rng) = initial_variational(model, x, method, opts, device)?;
        let params = flat_params(&var)?;
        let n = x.len();
        let (mean, log_sd) = params[2..].split_at(n);
        let state = FviState::new(
            device,
            x,
            &model.previous(x),
            mean,
            log_sd,
            (params[0], params[1]),
            opts.draws,
        )?;
        let dims = (n + 1) as f64;
        let settings = FviSettings {
            model: kernel_model(model),
            draws: opts.draws,
            mc_entropy: opts.entropy == Entropy::Mc,
            seed: opts.seed,
            constant: model.constant(n)
                + match opts.entropy {
                    Entropy::Mc => dims * HALF_LN_2PI,
                    Entropy::Analytic => dims * (0.5 + HALF_LN_2PI),
                },
            lr: opts.lr,
        };
        let kernels = FviKernels::load(device)?;
        kernels.draw_first_theta(&state, &settings)?;
        Ok(Self {
            kernels,
            state,
            settings,
            block,
            buf: Tensor::zeros([block as i64], (Kind::Float, device)),
            graph: BlockGraph::new(device)?,
            kind: opts.dtype.kind(),
            device,
            rng,
        })
    }

    /// Never capture: every block runs as separate launches.
    pub fn without_capture(mut self) -> Self {
        self.graph.disable();
        self
    }

    /// Steps per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the block has been captured as a CUDA graph.
    pub fn captured(&self) -> bool {
        self.graph.captured()
    }

    /// The device state (parameters, Adam moments, draws of the next step).
    pub fn state(&self) -> &FviState {
        &self.state
    }

    fn launches(
        kernels: &FviKernels,
        state: &FviState,
        settings: &FviSettings,
        buf: &Tensor,
        block: usize,
    ) -> Result<()> {
        for i in 0..block {
            kernels.step(state, settings, Some(&buf.narrow(0, i as i64, 1)), None)?;
        }
        Ok(())
    }

    /// Run one block of steps; returns their ELBO estimates as a `[block]`
    /// f32 tensor on the device (a copy).
    pub fn step_block(&mut self) -> Result<Tensor> {
        let Self {
            kernels,
            state,
            settings,
            block,
            buf,
            graph,
            device,
            ..
        } = self;
        graph.run(*device, buf, || {
            Self::launches(kernels, state, settings, buf, *block)
        })
    }

    /// One step outside any graph; its ELBO estimate as a `[1]` tensor.
    pub fn step(&mut self) -> Result<Tensor> {
        let out = Tensor::zeros([1], (Kind::Float, self.device));
        self.kernels
            .step(&self.state, &self.settings, Some(&out), None)?;
        Ok(out)
    }

    /// One step that also writes its draws and gradients (tests).
    pub fn step_debug(&mut self) -> Result<FviDebug> {
        let n = self.state.x.size()[0];
        let m = self.settings.draws as i64;
        let opts = (Kind::Float, self.device);
        let debug = FviDebug {
            eps: Tensor::full([m, n], f64::NAN, opts),
            grad: Tensor::full([2 * n], f64::NAN, opts),
            theta: Tensor::full([3], f64::NAN, opts),
        };
        self.kernels
            .step(&self.state, &self.settings, None, Some(&debug))?;
        Ok(debug)
    }

    /// Whether every parameter is finite (one device read).
    pub fn params_finite(&self) -> bool {
        let all = Tensor::cat(
            &[
                &self.state.mean,
                &self.state.log_sd,
                &self.state.theta_params,
            ],
            0,
        );
        all.isfinite().all().int64_value(&[]) == 1
    }

    /// The fitted parameters as an F-VI [`Variational`] on the device.
    pub fn into_variational(self) -> Result<Variational> {
        self.variational()
    }

    /// A copy of the current parameters as an F-VI [`Variational`] on the
    /// device.
    fn variational(&self) -> Result<Variational> {
        let n = self.state.x.size()[0] as usize;
        let mut params = crate::family::host_vec(&self.state.theta_params)?;
        params.extend(crate::family::host_vec(&self.state.mean)?);
        params.extend(crate::family::host_vec(&self.state.log_sd)?);
        Ok(flat_variational(&params, false, n, self.kind, self.device))
    }

    /// Number of learned scalars (2N + 2).
    pub fn num_parameters(&self) -> usize {
        2 * self.state.x.size()[0] as usize + 2
    }
}

impl Stepper for CudaFviTrainer {
    fn name(&self) -> &'static str {
        "fused CUDA engine"
    }

    fn block(&self) -> usize {
        self.block
    }

    fn steps(&mut self, len: usize) -> Result<Block> {
        let values = if len == self.block {
            self.step_block()?
        } else {
            let steps = (0..len).map(|_| self.step()).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&steps, 0)
        };
        Block::untimed(&values)
    }

    fn set_lr(&mut self, _lr: f64) -> Result<()> {
        // The engine choice refuses a schedule on CUDA before the run starts.
        Err(InferenceError::config(
            "lr_schedule",
            "the fused CUDA kernels take one learning rate",
        ))
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        Ok(vec![CudaFviTrainer::params_finite(self)])
    }

    fn monitor(
        &mut self,
        _run: usize,
        f: &mut dyn FnMut(&Variational) -> Result<()>,
    ) -> Result<()> {
        f(&self.variational()?)
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        let var = self.variational()?;
        Ok(vec![(var, self.rng)])
    }
}

/// The kernels' description of a fused model.
fn kernel_model(model: &FusedModel) -> KernelModel {
    match *model {
        FusedModel::Linear { tau, sigma } => KernelModel::Linear { tau, sigma },
        FusedModel::Nonlinear => KernelModel::Nonlinear,
        FusedModel::NonlinearAuthors => KernelModel::NonlinearAuthors,
        FusedModel::Saw { alpha, .. } => KernelModel::Saw { alpha },
    }
}
