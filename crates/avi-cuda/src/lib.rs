//! The libtorch entry points that avi needs and tch 0.24 does not bind:
//!
//! * [`CudaGraph`]: capture a sequence of libtorch calls made on this
//!   thread into a CUDA graph on its own stream, then replay it with one
//!   launch (`at::cuda::CUDAGraph`);
//! * [`FusedAdam`]: Adam through libtorch's fused kernel
//!   (`at::_fused_adam_`) with the step counts held in device tensors, so
//!   that an optimiser step reads nothing from the host and can be captured
//!   (tch's `nn::Adam` keeps its step count on the host and computes the bias
//!   corrections there);
//! * [`Generator`]: copies of libtorch's default generators, so that
//!   batched runs draw exactly as separate runs would, with their state
//!   readable and writable;
//! * [`TorchAdam`]: libtorch's own `torch::optim::Adam` as tch builds it,
//!   with its per-parameter state readable and writable (checkpoints);
//! * [`FviKernels`]: the F-VI training iteration of the scalar models as two
//!   CUDA kernels compiled at run time with NVRTC (draws in registers, Adam
//!   inside the kernels).
//!
//! The C++ side (`csrc/shim.cpp`) is compiled against the libtorch that
//! torch-sys links. Graphs need a libtorch with CUDA and the CUDA runtime
//! headers at build time ([`graphs_compiled`]); the fused Adam works on
//! every device.

use std::ffi::{c_char, c_int, c_void, CStr};

mod adam;
mod fvi;
mod generator;
pub use adam::{AdamParamState, TorchAdam};
pub use fvi::{FviDebug, FviKernels, FviSettings, FviState, KernelModel};
pub use generator::Generator;

use tch::{Device, Kind, Tensor};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libtorch threw; the message is its own.
    #[error("libtorch: {0}")]
    Torch(String),
    /// The operation needs something this build or device does not have.
    #[error("{0}")]
    Unsupported(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CudaError>;

type TensorPtr = *const torch_sys::C_tensor;

extern "C" {
    fn avi_cuda_error() -> *const c_char;
    fn avi_cuda_graphs_compiled() -> c_int;
    fn avi_fused_adam(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        exp_avgs: *const TensorPtr,
        exp_avg_sqs: *const TensorPtr,
        steps: *const TensorPtr,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> c_int;
    fn avi_graph_new(device: c_int, out: *mut *mut c_void) -> c_int;
    fn avi_graph_free(g: *mut c_void);
    fn avi_graph_enter_stream(g: *mut c_void) -> c_int;
    fn avi_graph_leave_stream(g: *mut c_void) -> c_int;
    fn avi_graph_sync_stream(g: *mut c_void) -> c_int;
    fn avi_graph_capture_begin(g: *mut c_void) -> c_int;
    fn avi_graph_capture_end(g: *mut c_void) -> c_int;
    fn avi_graph_replay(g: *mut c_void) -> c_int;
    fn avi_cuda_peak_allocated(device: c_int, out: *mut i64) -> c_int;
}

fn check(rc: c_int) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: avi_cuda_error returns a pointer to this thread's
    // NUL-terminated error string, valid until the next failing call on the
    // thread; it is copied at once.
    let msg = unsafe { CStr::from_ptr(avi_cuda_error()) }
        .to_string_lossy()
        .into_owned();
    Err(CudaError::Torch(msg))
}

/// Whether CUDA graph support was compiled in (a CUDA libtorch and the CUDA
/// runtime headers were found at build time).
pub fn graphs_compiled() -> bool {
    // SAFETY: a pure query without arguments.
    unsafe { avi_cuda_graphs_compiled() == 1 }
}

/// Peak bytes held by libtorch's CUDA caching allocator on `device` since
/// the process started (its `allocated_bytes` peak statistic).
pub fn peak_allocated_bytes(device: Device) -> Result<u64> {
    let Device::Cuda(index) = device else {
        return Err(CudaError::Unsupported(format!(
            "allocator statistics need a CUDA device, not {device:?}"
        )));
    };
    let mut out = 0i64;
    // SAFETY: `out` is a valid out-pointer for the duration of the call.
    check(unsafe { avi_cuda_peak_allocated(index as c_int, &mut out) })?;
    Ok(out.max(0) as u64)
}

/// Adam (β = (0.9, 0.999), ε = 1e-8, no weight decay; the defaults of
/// tch's `nn::Adam`) over a fixed list of parameters, one fused libtorch
/// kernel per step, with per-parameter step counts in f32 device tensors.
#[derive(Debug)]
pub struct FusedAdam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: Vec<Tensor>,
}

impl FusedAdam {
    /// Set the learning rate of the following steps (a step captured in a
    /// CUDA graph keeps the rate it was captured with).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Adam over `params` (leaf tensors that require gradients, all on one
    /// device and of one floating kind) with learning rate `lr`.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Result<Self> {
        let Some(first) = params.first() else {
            return Ok(Self {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                params,
                exp_avg: vec![],
                exp_avg_sq: vec![],
                steps: vec![],
            });
        };
        let (device, kind) = (first.device(), first.kind());
        if params
            .iter()
            .any(|p| p.device() != device || p.kind() != kind)
        {
            return Err(CudaError::Unsupported(
                "fused Adam needs every parameter on one device with one kind".into(),
            ));
        }
        let exp_avg = params.iter().map(Tensor::zeros_like).collect();
        let exp_avg_sq = params.iter().map(Tensor::zeros_like).collect();
        let steps = params
            .iter()
            .map(|_| Tensor::zeros([], (Kind::Float, device)))
            .collect();
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            params,
            exp_avg,
            exp_avg_sq,
            steps,
        })
    }

    /// Adam's state, per parameter in the order given to [`FusedAdam::new`]:
    /// the first and second moments and the step count (an f32 scalar
    /// tensor), for a checkpoint.
    pub fn state(&self) -> (&[Tensor], &[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq, &self.steps)
    }

    /// Copy a saved [`FusedAdam::state`] into this one, in place (the
    /// tensors keep their storage, as a captured graph requires); shapes
    /// and kinds must match.
    pub fn set_state(
        &mut self,
        exp_avg: &[Tensor],
        exp_avg_sq: &[Tensor],
        steps: &[Tensor],
    ) -> Result<()> {
        let n = self.params.len();
        if exp_avg.len() != n || exp_avg_sq.len() != n || steps.len() != n {
            return Err(CudaError::Unsupported(format!(
                "an Adam state of {} parameters for an optimiser of {n}",
                exp_avg.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        for (mine, saved) in [
            (&mut self.exp_avg, exp_avg),
            (&mut self.exp_avg_sq, exp_avg_sq),
            (&mut self.steps, steps),
        ] {
            for (m, s) in mine.iter_mut().zip(saved) {
                if m.size() != s.size() || m.kind() != s.kind() {
                    return Err(CudaError::Unsupported(format!(
                        "an Adam state tensor of shape {:?} ({:?}) for one of {:?} ({:?})",
                        s.size(),
                        s.kind(),
                        m.size(),
                        m.kind()
                    )));
                }
                m.copy_(&s.to_device(m.device()));
            }
        }
        Ok(())
    }

    /// Set every existing gradient to zero in place (the gradient tensors
    /// keep their storage, as a captured graph requires).
    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One Adam step of the parameters that have a gradient.
    pub fn step(&mut self) -> Result<()> {
        let mut ptrs: [Vec<TensorPtr>; 5] = Default::default();
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        for (i, g) in grads.iter().enumerate() {
            if !g.defined() {
                continue;
            }
            ptrs[0].push(self.params[i].as_ptr());
            ptrs[1].push(g.as_ptr());
            ptrs[2].push(self.exp_avg[i].as_ptr());
            ptrs[3].push(self.exp_avg_sq[i].as_ptr());
            ptrs[4].push(self.steps[i].as_ptr());
        }
        if ptrs[0].is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        // SAFETY: every pointer is a live tch tensor handle (`torch::Tensor*`)
        // owned by `self` or `grads`, which outlive the call; the five arrays
        // have the same length n.
        check(unsafe {
            avi_fused_adam(
                ptrs[0].as_ptr(),
                ptrs[1].as_ptr(),
                ptrs[2].as_ptr(),
                ptrs[3].as_ptr(),
                ptrs[4].as_ptr(),
                ptrs[0].len(),
                self.lr,
                self.beta1,
                self.beta2,
                self.eps,
            )
        })
    }
}

/// A CUDA graph with its own capture stream on one device.
///
/// Use: run a few warm-up iterations inside [`CudaGraph::enter_stream`] /
/// [`CudaGraph::leave_stream`] (libtorch then creates its handles and caches
/// for that stream), then [`CudaGraph::capture`] the iterations, then
/// [`CudaGraph::replay`] them on the current stream. Tensors that the
/// captured work reads or writes must keep their storage between replays;
/// random draws of libtorch's CUDA generator advance at every replay as they
/// would eagerly.
#[derive(Debug)]
pub struct CudaGraph {
    ptr: *mut c_void,
    captured: bool,
}

impl CudaGraph {
    /// A new, empty graph for `device` (a CUDA device).
    pub fn new(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(CudaError::Unsupported(format!(
                "CUDA graphs need a CUDA device, not {device:?}"
            )));
        };
        if !graphs_compiled() {
            return Err(CudaError::Unsupported(
                "avi-cuda was built without CUDA graphs (no CUDA libtorch or CUDA headers)".into(),
            ));
        }
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; on success it receives an
        // object that `Drop` frees exactly once.
        check(unsafe { avi_graph_new(index as c_int, &mut ptr) })?;
        Ok(Self {
            ptr,
            captured: false,
        })
    }

    /// Make the graph's stream the current CUDA stream of this thread.
    pub fn enter_stream(&self) -> Result<()> {
        // SAFETY: `self.ptr` is the live object from avi_graph_new.
        check(unsafe { avi_graph_enter_stream(self.ptr) })
    }

    /// Restore the stream that was current before [`CudaGraph::enter_stream`].
    pub fn leave_stream(&self) -> Result<()> {
        // SAFETY: as above.
        check(unsafe { avi_graph_leave_stream(self.ptr) })
    }

    /// Wait until the graph's stream is idle.
    pub fn sync_stream(&self) -> Result<()> {
        // SAFETY: as above.
        check(unsafe { avi_graph_sync_stream(self.ptr) })
    }

    /// Capture the libtorch work that `f` queues on this thread (on the
    /// graph's stream, which is entered and left here). Nothing runs during
    /// capture; [`CudaGraph::replay`] runs it. A graph is captured once.
    pub fn capture<R, E>(
        &mut self,
        f: impl FnOnce() -> std::result::Result<R, E>,
    ) -> Result<std::result::Result<R, E>> {
        if self.captured {
            return Err(CudaError::Unsupported(
                "this graph is already captured".into(),
            ));
        }
        self.enter_stream()?;
        // SAFETY: as above.
        if let Err(e) = check(unsafe { avi_graph_capture_begin(self.ptr) }) {
            let _ = self.leave_stream();
            return Err(e);
        }
        let out = f();
        // SAFETY: as above; a capture was begun on this graph.
        let end = check(unsafe { avi_graph_capture_end(self.ptr) });
        let leave = self.leave_stream();
        end?;
        leave?;
        self.captured = true;
        Ok(out)
    }

    /// Launch the captured work once on the current stream (asynchronous).
    pub fn replay(&self) -> Result<()> {
        if !self.captured {
            return Err(CudaError::Unsupported("replay before capture".into()));
        }
        // SAFETY: as above; the graph holds a completed capture.
        check(unsafe { avi_graph_replay(self.ptr) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from avi_graph_new and is freed only here.
        unsafe { avi_graph_free(self.ptr) }
    }
}

/// Serialises this crate's tests that use libtorch's process-wide
/// generator.
#[cfg(test)]
pub(crate) static TEST_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};

    /// The fused Adam follows tch's `nn::Adam` step by step. f64 and the
    /// same gradients: the two differ only in rounding of a handful of
    /// operations per step, so 1e-12 relative after 30 steps is ample.
    #[test]
    fn fused_adam_matches_tch_adam() {
        let _g = TEST_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let target = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let mut vs_a = nn::VarStore::new(Device::Cpu);
        let mut vs_b = nn::VarStore::new(Device::Cpu);
        let init = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let _ = vs_a.root().var_copy("w", &init);
        let _ = vs_b.root().var_copy("w", &init);
        vs_a.double();
        vs_b.double();
        let a = vs_a.trainable_variables().remove(0);
        let b = vs_b.trainable_variables().remove(0);
        assert_eq!(a.kind(), Kind::Double);
        let mut opt_a = nn::Adam::default().build(&vs_a, 0.05).unwrap();
        let mut opt_b = FusedAdam::new(vs_b.trainable_variables(), 0.05).unwrap();
        for step in 0..30 {
            // a non-quadratic loss, so the gradients vary in scale
            let loss_a = (&a - &target).square().sum(Kind::Double) + a.sin().sum(Kind::Double);
            opt_a.zero_grad();
            loss_a.backward();
            opt_a.step();
            let loss_b = (&b - &target).square().sum(Kind::Double) + b.sin().sum(Kind::Double);
            opt_b.zero_grad();
            loss_b.backward();
            opt_b.step().unwrap();
            let diff = (&a - &b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-12 * scale,
                "step {step}: max |Δ| = {diff:e} (scale {scale})"
            );
        }
        // and it moved: not a test of two frozen tensors
        assert!((&a - &init).abs().max().double_value(&[]) > 0.1);
    }

    #[test]
    fn graphs_need_cuda() {
        let err = CudaGraph::new(Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("CUDA device"), "{err}");
    }
}
