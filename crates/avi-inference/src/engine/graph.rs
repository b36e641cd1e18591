//! The graph engine: the libtorch step with a device-side Adam, blocks of
//! steps captured as CUDA graphs on CUDA ([`GraphTrainer`]).

use tch::{Device, Tensor};

use crate::engine::torch::Trainer;
use crate::engine::{params_finite, Block, EngineState, Stepper};
use crate::method::Variational;
use crate::options::Engine;
use crate::rng::Draws;
use crate::{InferenceError, Result};

/// Runs a [`Trainer`] of [`Engine::Graph`] in blocks of a fixed number of
/// steps, each step's ELBO estimate written into a device buffer. On CUDA
/// the first block runs eagerly on the graph's own stream (warm-up: libtorch
/// creates its handles and caches there), the second is captured as one CUDA
/// graph, and every later block is one replay of it; nothing is read back to
/// the host inside a block. On the CPU every block runs eagerly. While a
/// block is captured, no other thread of the process may make a
/// synchronising CUDA call (CUDA's global capture mode; see
/// `global_guard`, which the training loop holds while it drives a
/// capturing engine).
pub struct GraphTrainer<'a> {
    trainer: Trainer<'a>,
    block: usize,
    buf: Tensor,
    graph: BlockGraph,
}

/// Blocks of steps as a CUDA graph: the first block runs eagerly on the
/// graph's own stream (warm-up: libtorch creates its handles and caches
/// there), the second is captured, every later one is one replay. Without
/// a graph (the CPU, or capture turned off) every block runs eagerly.
pub(crate) struct BlockGraph {
    graph: Option<avi_cuda::CudaGraph>,
    captured: bool,
}

impl BlockGraph {
    /// A graph on CUDA devices, none elsewhere.
    pub(crate) fn new(device: Device) -> Result<Self> {
        let graph = match device {
            Device::Cuda(_) => Some(avi_cuda::CudaGraph::new(device)?),
            _ => None,
        };
        Ok(Self {
            graph,
            captured: false,
        })
    }

    /// Never capture.
    pub(crate) fn disable(&mut self) {
        self.graph = None;
    }

    pub(crate) fn captured(&self) -> bool {
        self.captured
    }

    /// Whether blocks may be captured (a CUDA device, capture not turned
    /// off).
    pub(crate) fn enabled(&self) -> bool {
        self.graph.is_some()
    }

    /// One block: `run` queues its steps, which write their ELBO
    /// estimates into `buf`; returns a copy of `buf`.
    pub(crate) fn run(
        &mut self,
        device: Device,
        buf: &Tensor,
        mut run: impl FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let Some(g) = &mut self.graph else {
            run()?;
            return Ok(buf.copy());
        };
        if self.captured {
            g.replay()?;
            return Ok(buf.copy());
        }
        // Warm-up on the graph's stream, after the parameters (made on the
        // default stream) are complete.
        tch::Cuda::synchronize(device_index(device));
        g.enter_stream()?;
        let warm = run().map(|()| buf.copy());
        g.sync_stream()?;
        g.leave_stream()?;
        let out = warm?;
        // Capture the next block; it runs at the first replay.
        g.capture(&mut run)??;
        self.captured = true;
        Ok(out)
    }
}

impl std::fmt::Debug for GraphTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTrainer")
            .field("trainer", &self.trainer)
            .field("block", &self.block)
            .field("captured", &self.graph.captured())
            .finish()
    }
}

impl<'a> GraphTrainer<'a> {
    /// Blocks of `block` steps of `trainer`, which must use
    /// [`Engine::Graph`] (device-side Adam). With mini-batches the order
    /// must be fixed (no `shuffle`) and a block must hold a whole number of
    /// epochs (⌈N / B⌉ steps each): a captured block reads the batches at
    /// the positions it was captured with, so every replay must start where
    /// the capture did.
    pub fn new(trainer: Trainer<'a>, block: usize) -> Result<Self> {
        if trainer.opts.engine != Engine::Graph {
            return Err(InferenceError::config(
                "engine",
                "a GraphTrainer needs a trainer built with engine \"graph\"",
            ));
        }
        if block == 0 {
            return Err(InferenceError::config("check_every", "must be at least 1"));
        }
        if let Some(b) = trainer.opts.batch_size {
            if trainer.opts.shuffle {
                return Err(InferenceError::config(
                    "shuffle",
                    "the graph engine replays a fixed batch order: mini-batches without shuffling only",
                ));
            }
            let epoch = (trainer.x.size()[0] as usize).div_ceil(b);
            if block % epoch != 0 {
                return Err(InferenceError::config(
                    "check_every",
                    format!(
                        "the graph engine replays whole epochs: its blocks of {block} steps \
                         (check_every, or its gcd with the monitoring interval) are not a \
                         multiple of the {epoch} mini-batches of an epoch"
                    ),
                ));
            }
        }
        let device = trainer.x.device();
        let mut trainer = trainer;
        if device.is_cuda() {
            // A captured block records the default generator's offsets: draw
            // from it, under the capture lock that the loop holds.
            trainer.rng.hand_back()?;
            trainer.rng = Draws::Default;
        }
        let buf = Tensor::zeros([block as i64], (trainer.opts.dtype.kind(), device));
        Ok(Self {
            trainer,
            block,
            buf,
            graph: BlockGraph::new(device)?,
        })
    }

    /// Never capture: every block runs eagerly, with the same kernels (the
    /// reference that a captured run is compared with).
    pub fn without_capture(mut self) -> Self {
        self.graph.disable();
        self
    }

    /// Steps per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the block has been captured as a CUDA graph (CUDA only).
    pub fn captured(&self) -> bool {
        self.graph.captured()
    }

    fn eager_block(trainer: &mut Trainer<'_>, buf: &Tensor, block: usize) -> Result<()> {
        for i in 0..block {
            let elbo = trainer.step()?;
            buf.narrow(0, i as i64, 1).copy_(&elbo.view([1]));
        }
        Ok(())
    }

    /// Run one block of steps; returns their ELBO estimates as a `[block]`
    /// tensor on the device (a copy, not overwritten by later blocks).
    pub fn step_block(&mut self) -> Result<Tensor> {
        let Self {
            trainer,
            block,
            buf,
            graph,
        } = self;
        let device = trainer.x.device();
        graph.run(device, buf, || Self::eager_block(trainer, buf, *block))
    }

    /// One step outside any graph (for a last, shorter block).
    pub fn step(&mut self) -> Result<Tensor> {
        self.trainer.step()
    }

    /// Set the learning rate of the following blocks: a captured graph
    /// keeps the rate it was captured with, so the next block warms up and
    /// is captured anew.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.trainer.set_lr(lr);
        let device = self.trainer.x.device();
        let capture = self.graph.enabled();
        self.graph = BlockGraph::new(device)?;
        if !capture {
            self.graph.disable();
        }
        Ok(())
    }

    /// The trainer (its parameters and data).
    pub fn trainer(&self) -> &Trainer<'a> {
        &self.trainer
    }

    /// Take the trainer back.
    pub fn into_trainer(self) -> Trainer<'a> {
        self.trainer
    }
}

fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

impl Stepper for GraphTrainer<'_> {
    fn name(&self) -> &'static str {
        "graph engine"
    }

    fn block(&self) -> usize {
        self.block
    }

    fn steps(&mut self, len: usize) -> Result<Block> {
        let values = if len == self.block {
            self.step_block()?
        } else {
            let steps = (0..len)
                .map(|_| self.step().map(|t| t.view([-1])))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&steps, 0)
        };
        Block::untimed(&values)
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        GraphTrainer::set_lr(self, lr)
    }

    /// On the CPU (no CUDA graph): the libtorch trainer's state with the
    /// device-side Adam's moments and step counts. On CUDA the blocks draw
    /// from the default generator under capture: refused (not tested on a
    /// device).
    fn state(&self) -> Result<EngineState> {
        if self.graph.enabled() {
            return Err(crate::engine::cannot_checkpoint("graph engine on CUDA"));
        }
        self.trainer.state()
    }

    fn restore(&mut self, state: &EngineState) -> Result<()> {
        if self.graph.enabled() {
            return Err(crate::engine::cannot_checkpoint("graph engine on CUDA"));
        }
        self.trainer.restore(state)
    }

    fn params_finite(&self) -> Result<Vec<bool>> {
        Ok(vec![params_finite(&self.trainer.var.vs)])
    }

    fn monitor(
        &mut self,
        _run: usize,
        f: &mut dyn FnMut(&Variational) -> Result<()>,
    ) -> Result<()> {
        f(&self.trainer.var)
    }

    fn data(&self) -> Option<Tensor> {
        Some(self.trainer.x.shallow_clone())
    }

    fn exclusive(&self) -> bool {
        self.trainer.x.device().is_cuda()
    }

    fn finish(self: Box<Self>) -> Result<Vec<(Variational, Draws)>> {
        Box::new(self.trainer).finish()
    }
}
