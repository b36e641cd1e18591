//! The engines that take a fit's steps, behind one trait ([`Stepper`]) that
//! the one training loop of [`crate::fit`] drives.

use std::time::Instant;

use tch::{nn, Kind, Tensor};

use crate::family::host_vec;
use crate::method::Variational;
use crate::rng::Draws;
use crate::{InferenceError, Result};

pub(crate) mod batched;
pub(crate) mod cavi;
pub(crate) mod fused;
pub(crate) mod fused_cuda;
pub(crate) mod graph;
pub(crate) mod torch;

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

/// The ELBO estimates of a block of steps, from [`Stepper::steps`].
#[derive(Debug)]
pub(crate) struct Block {
    /// Step-major: the estimate of step `i` of the block for run `r` is
    /// `values[i * runs + r]`. Fewer steps than asked when an engine that
    /// reads every estimate stopped at a non-finite one.
    pub(crate) values: Vec<f64>,
    /// The host clock at the end of each step, for engines that take their
    /// steps one at a time on the host clock; `None`: the loop spreads the
    /// block's time evenly over its steps.
    pub(crate) stamps: Option<Vec<Instant>>,
}

impl Block {
    /// `len` steps taken one at a time by `step` (each returns its ELBO
    /// estimates, one per run, on the device), with the host clock after
    /// each; the estimates are read in one device read at the end.
    pub(crate) fn timed(len: usize, mut step: impl FnMut() -> Result<Tensor>) -> Result<Self> {
        let mut values = Vec::with_capacity(len);
        let mut stamps = Vec::with_capacity(len);
        for _ in 0..len {
            values.push(step()?);
            stamps.push(Instant::now());
        }
        // [len] or [len, R], step-major
        Ok(Self {
            values: host_vec(&Tensor::stack(&values, 0))?,
            stamps: Some(stamps),
        })
    }

    /// The estimates of a block run as one unit (`[len]` on the device),
    /// timed by the loop at the block's end.
    pub(crate) fn untimed(values: &Tensor) -> Result<Self> {
        Ok(Self {
            values: host_vec(values)?,
            stamps: None,
        })
    }
}

/// An engine's state between two blocks: everything a freshly built engine
/// of the same problem needs to continue exactly as this one would (the
/// variational parameters, the optimiser's moments and step counts, the
/// random generators, the learning rate), as named CPU tensors.
#[derive(Debug, Default)]
pub(crate) struct EngineState {
    pub(crate) tensors: Vec<(String, Tensor)>,
}

impl EngineState {
    /// Add `tensor` (copied to the CPU, detached) under `name`.
    pub(crate) fn put(&mut self, name: impl Into<String>, tensor: &Tensor) {
        let t = tch::no_grad(|| tensor.detach().to_device(tch::Device::Cpu).contiguous());
        // A tensor already on the CPU is shared, not copied, by `to_device`.
        let t = if t.data_ptr() == tensor.data_ptr() {
            t.copy()
        } else {
            t
        };
        self.tensors.push((name.into(), t));
    }

    /// Add host values under `name` (f64, or i64 for counts).
    pub(crate) fn put_f64(&mut self, name: &str, values: &[f64]) {
        self.tensors.push((name.into(), Tensor::from_slice(values)));
    }

    /// Add a count under `name`.
    pub(crate) fn put_i64(&mut self, name: &str, value: i64) {
        self.tensors
            .push((name.into(), Tensor::from_slice(&[value])));
    }

    /// The tensor under `name`.
    pub(crate) fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                InferenceError::config("resume", format!("the checkpoint has no `{name}`"))
            })
    }

    /// Whether there is a tensor under `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.iter().any(|(n, _)| n == name)
    }

    /// The f64 values under `name`, `len` of them.
    pub(crate) fn f64s(&self, name: &str, len: usize) -> Result<Vec<f64>> {
        let t = self.get(name)?;
        if t.kind() != Kind::Double || t.numel() != len {
            return Err(InferenceError::config(
                "resume",
                format!(
                    "`{name}` holds {} values of {:?}, the fit {len} f64",
                    t.numel(),
                    t.kind()
                ),
            ));
        }
        host_vec(t)
    }

    /// The count under `name`.
    pub(crate) fn i64(&self, name: &str) -> Result<i64> {
        let t = self.get(name)?;
        if t.kind() != Kind::Int64 || t.numel() != 1 {
            return Err(InferenceError::config(
                "resume",
                format!("`{name}` is not one i64"),
            ));
        }
        Ok(t.int64_value(&[0]))
    }

    /// Add a [`avi_cuda::FusedAdam`]'s state: per parameter its moments
    /// and f32 step count (`fused_adam/<i>/…`), and their number.
    pub(crate) fn put_fused_adam(&mut self, adam: &avi_cuda::FusedAdam) {
        let (m, v, steps) = adam.state();
        self.put_i64("fused_adam/len", m.len() as i64);
        for (i, ((m, v), t)) in m.iter().zip(v).zip(steps).enumerate() {
            self.put(format!("fused_adam/{i}/exp_avg"), m);
            self.put(format!("fused_adam/{i}/exp_avg_sq"), v);
            self.put(format!("fused_adam/{i}/step"), t);
        }
    }

    /// Give `adam` the state [`EngineState::put_fused_adam`] stored.
    pub(crate) fn restore_fused_adam(&self, adam: &mut avi_cuda::FusedAdam) -> Result<()> {
        let len = adam.state().0.len();
        if !self.has("fused_adam/len") || self.i64("fused_adam/len")? != len as i64 {
            return Err(InferenceError::config(
                "resume",
                "the checkpoint's optimizer has another number of parameters",
            ));
        }
        let part = |what: &str| {
            (0..len)
                .map(|i| {
                    self.get(&format!("fused_adam/{i}/{what}"))
                        .map(Tensor::shallow_clone)
                })
                .collect::<Result<Vec<_>>>()
        };
        adam.set_state(&part("exp_avg")?, &part("exp_avg_sq")?, &part("step")?)?;
        Ok(())
    }

    /// Copy the tensor under `name` into `dst` (same shape and kind).
    pub(crate) fn copy_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        let src = self.get(name)?;
        if src.size() != dst.size() || src.kind() != dst.kind() {
            return Err(InferenceError::config(
                "resume",
                format!(
                    "`{name}` is {:?} {:?}, the fit's {:?} {:?}",
                    src.kind(),
                    src.size(),
                    dst.kind(),
                    dst.size()
                ),
            ));
        }
        tch::no_grad(|| dst.f_copy_(src))?;
        Ok(())
    }
}

/// The error of an engine that cannot save or restore its state.
pub(crate) fn cannot_checkpoint(engine: &str) -> InferenceError {
    InferenceError::config(
        "checkpoint",
        format!("the {engine} cannot checkpoint (the libtorch engine \"torch\" and the fused CPU engine \"fused\" can)"),
    )
}

/// An engine as the one training loop sees it: it takes blocks of steps of
/// every run and reports their ELBO estimates; the loop owns the trace, the
/// divergence rule, the learning-rate schedule, monitoring and the
/// observer.
pub(crate) trait Stepper {
    /// Runs R optimised together (1 except for batched seeds).
    fn runs(&self) -> usize {
        1
    }

    /// The steps the engine runs as one unit (a CUDA graph replay); the
    /// loop's blocks start at multiples of it and are never longer.
    fn block(&self) -> usize {
        usize::MAX
    }

    /// Take `len` steps (at most [`Stepper::block`]).
    fn steps(&mut self, len: usize) -> Result<Block>;

    /// The learning rate of the following steps (Adam's moments carry
    /// over).
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// Per run: whether every variational parameter is finite.
    fn params_finite(&self) -> Result<Vec<bool>>;

    /// Call `f` with run `run`'s current parameters (for monitoring).
    fn monitor(&mut self, run: usize, f: &mut dyn FnMut(&Variational) -> Result<()>) -> Result<()>;

    /// The data on the fit's device in its dtype, when the engine holds
    /// them there (the final evaluation then uses them instead of a second
    /// copy); `None` for the engines that keep the data on the host.
    fn data(&self) -> Option<Tensor> {
        None
    }

    /// Whether the loop must hold [`global_guard`] while it drives the
    /// engine (CUDA graph capture).
    fn exclusive(&self) -> bool {
        false
    }

    /// The engine's state between blocks, for a checkpoint; engines that
    /// cannot save it say so.
    fn state(&self) -> Result<EngineState> {
        Err(cannot_checkpoint(self.name()))
    }

    /// Continue from `state` (from [`Stepper::state`] of the same engine on
    /// the same problem); engines that cannot say so.
    fn restore(&mut self, state: &EngineState) -> Result<()> {
        let _ = state;
        Err(cannot_checkpoint(self.name()))
    }

    /// The engine's name in messages.
    fn name(&self) -> &'static str {
        "engine"
    }

    /// The fitted parameters of every run, each with the generator its
    /// final evaluation draws from.
    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>>;
}
