//! The engines that take a fit's steps, behind one trait ([`Stepper`]) that
//! the one training loop of [`crate::fit`] drives.

use std::time::Instant;

use tch::{nn, Kind, Tensor};

use crate::family::host_vec;
use crate::method::Variational;
use crate::rng::Draws;
use crate::Result;

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

    /// The fitted parameters of every run, each with the generator its
    /// final evaluation draws from.
    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>>;
}
