//! The engines that take a fit's steps, behind one trait ([`Stepper`]) that
//! the one training loop of [`crate::fit`] drives.

use std::sync::Mutex;
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use crate::method::Variational;
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

/// libtorch's process-wide default generators and CUDA's global capture
/// mode: held while a fit seeds and initialises (from the default
/// generator), while it draws a shuffle order, and for the whole of a fit
/// that captures CUDA graphs (a capture must not meet another thread's
/// synchronising CUDA calls). Between those moments each fit draws from its
/// own generator ([`Draws`]), so fits in different threads run side by side.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Hold the lock on libtorch's default generators and on CUDA graph
/// capture (a process-wide mutex, held while a fit seeds and initialises,
/// draws a shuffle order, or captures CUDA graphs).
pub fn global_guard() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tests that seed or draw from libtorch's default generator directly run
/// one at a time under this lock (not [`global_guard`], which the engines'
/// constructors take themselves).
#[cfg(test)]
pub(crate) fn test_serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a fit's standard normals come from.
#[derive(Debug)]
pub(crate) enum Draws {
    /// The fit's own copy of libtorch's generator: the draws the default
    /// generator would give, without touching it.
    Own(avi_cuda::Generator),
    /// libtorch's default generator (a fit that captures CUDA graphs: the
    /// capture records the default generator's offsets; it holds
    /// [`global_guard`] throughout).
    Default,
}

impl Draws {
    /// Standard normals of shape `size`.
    pub(crate) fn randn(&self, size: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        match self {
            Self::Own(g) => Ok(g.randn(size, kind)?),
            Self::Default => Ok(Tensor::randn(size, (kind, device))),
        }
    }

    /// Run `f`, which draws from libtorch's default generator, as if it
    /// drew from this stream (the default generator's own state is left
    /// where this stream ends).
    pub(crate) fn with_default<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        match self {
            Self::Default => Ok(f()),
            Self::Own(g) => {
                let device = g.device();
                let _lock = global_guard();
                g.restore_default()?;
                let out = f();
                *g = avi_cuda::Generator::clone_default(device)?;
                Ok(out)
            }
        }
    }

    /// Leave libtorch's default generator where this stream is, so that
    /// draws made after a fit from the default generator continue the
    /// fit's stream (as when every fit drew from it).
    pub(crate) fn hand_back(&self) -> Result<()> {
        if let Self::Own(g) = self {
            let _lock = global_guard();
            g.restore_default()?;
        }
        Ok(())
    }
}

/// Seed libtorch's default generators with `seed`, run `init` (which draws
/// the initial parameters from them) and return its value with a generator
/// that continues the stream where `init` left it, on `device`.
pub(crate) fn seeded<T>(
    seed: u64,
    device: Device,
    init: impl FnOnce() -> Result<T>,
) -> Result<(T, Draws)> {
    let _lock = global_guard();
    tch::manual_seed(seed as i64);
    let value = init()?;
    Ok((
        value,
        Draws::Own(avi_cuda::Generator::clone_default(device)?),
    ))
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

    /// Whether the loop must hold [`global_guard`] while it drives the
    /// engine (CUDA graph capture).
    fn exclusive(&self) -> bool {
        false
    }

    /// The fitted parameters of every run, each with the generator its
    /// final evaluation draws from.
    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>>;
}
